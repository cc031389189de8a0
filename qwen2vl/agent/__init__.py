"""Agents: grounding (boxes, coordinate spaces, drawing), tool-call formats and parsing (tools), the
computer_use action schema (actions, constraint), a headless-Chromium executor (browser), the agent
loop (loop, policy) and MiniWoB++ (miniwob); ``qwen2vl agent`` is cli. See docs/agent.md."""

"""Agents: grounding (boxes and quads in model output, coordinate spaces, drawing)."""

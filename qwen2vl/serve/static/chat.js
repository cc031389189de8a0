// The chat page: send the conversation to /v1/chat/completions, show the answer as it streams,
// and draw the answer's boxes over the latest image. Boxes are Qwen2-VL's grounding syntax
//   <|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>
// with coordinates in [0, 1000) of the image's width and height (so they are percentages / 10).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], pending: [], lastImage: null, model: null, busy: false };

// ------------------------------------------------------------------------------------ grounding

const ELEMENT = /<\|object_ref_start\|>([\s\S]*?)<\|object_ref_end\|>|<\|box_start\|>([\s\S]*?)<\|box_end\|>|<\|quad_start\|>([\s\S]*?)<\|quad_end\|>/g;
const POINT = /\(\s*(\d+)\s*,\s*(\d+)\s*\)/g;

// "(a,b),(c,d)" with exactly `count` points and nothing else but spaces and commas -> [a, b, c, d]
function points(body, count) {
  const found = [...body.matchAll(POINT)];
  if (found.length !== count || body.replace(POINT, "").replace(/,/g, "").trim()) return null;
  return found.flatMap((m) => [Number(m[1]), Number(m[2])]);
}

// Every box (quads as their bounding box), each labelled with the latest reference before it.
function parseRegions(text) {
  const regions = [];
  let label = null;
  for (const m of text.matchAll(ELEMENT)) {
    if (m[1] !== undefined) { label = m[1].trim().replace(/\s+/g, " ") || null; continue; }
    const coords = m[2] !== undefined ? points(m[2], 2) : points(m[3], 4);
    if (!coords) continue;
    const xs = coords.filter((_, i) => i % 2 === 0), ys = coords.filter((_, i) => i % 2 === 1);
    const clamp = (v) => Math.min(Math.max(v, 0), 1000);
    regions.push({ label, x1: clamp(Math.min(...xs)), y1: clamp(Math.min(...ys)),
                   x2: clamp(Math.max(...xs)), y2: clamp(Math.max(...ys)) });
  }
  return regions;
}

// The answer as people read it: references as their label, boxes as their coordinates.
function readable(text) {
  return text
    .replace(/<\|object_ref_start\|>([\s\S]*?)<\|object_ref_end\|>/g, "$1")
    .replace(/<\|box_start\|>([\s\S]*?)<\|box_end\|>/g, " [$1]")
    .replace(/<\|quad_start\|>([\s\S]*?)<\|quad_end\|>/g, " [$1]")
    .replace(/<\|[a-z_]+\|>/g, "");
}

function drawRegions(figure, regions) {
  figure.querySelectorAll(".box").forEach((b) => b.remove());
  for (const r of regions) {
    const box = document.createElement("div");
    box.className = "box";
    box.style.left = `${r.x1 / 10}%`;
    box.style.top = `${r.y1 / 10}%`;
    box.style.width = `${(r.x2 - r.x1) / 10}%`;
    box.style.height = `${(r.y2 - r.y1) / 10}%`;
    box.dataset.coords = `${r.x1},${r.y1},${r.x2},${r.y2}`;
    if (r.label) {
      const tag = document.createElement("span");
      tag.className = "box-label";
      tag.textContent = r.label;
      box.appendChild(tag);
    }
    figure.appendChild(box);
  }
}

// ------------------------------------------------------------------------------------- messages

function addMessage(role) {
  const el = document.createElement("div");
  el.className = `message ${role}`;
  $("messages").appendChild(el);
  return el;
}

function showUser(text, images) {
  const el = addMessage("user");
  if (images.length) {
    const thumbs = document.createElement("div");
    thumbs.className = "thumbs";
    for (const url of images) {
      const img = document.createElement("img");
      img.src = url;
      thumbs.appendChild(img);
    }
    el.appendChild(thumbs);
  }
  el.appendChild(document.createTextNode(text));
}

// An assistant bubble; update(raw) re-renders the text and the boxes drawn over the latest image.
function assistantView() {
  const el = addMessage("assistant");
  const answer = document.createElement("div");
  answer.className = "answer";
  el.appendChild(answer);
  el.dataset.chunks = "0";
  let figure = null;
  return {
    el,
    update(raw) {
      answer.textContent = readable(raw);
      el.dataset.raw = raw;
      const regions = parseRegions(raw);
      if (regions.length && state.lastImage) {
        if (!figure) {
          figure = document.createElement("figure");
          figure.className = "grounding";
          const img = document.createElement("img");
          img.src = state.lastImage;
          figure.appendChild(img);
          el.appendChild(figure);
        }
        drawRegions(figure, regions);
      }
      $("messages").scrollTop = $("messages").scrollHeight;
    },
    fail(message) {
      const err = document.createElement("div");
      err.className = "error";
      err.textContent = message;
      el.appendChild(err);
    },
    done(usage) {
      el.dataset.done = "true";
      if (usage) {
        const u = document.createElement("div");
        u.className = "usage";
        u.textContent = `${usage.prompt_tokens} prompt + ${usage.completion_tokens} answer tokens`;
        el.appendChild(u);
      }
    },
  };
}

// --------------------------------------------------------------------------------------- sending

// Server-sent events -> calls of onEvent(json) for each "data:" payload until [DONE].
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  const images = state.pending.splice(0);
  renderAttachments();
  if (!text && !images.length) return;
  const content = images.map((url) => ({ type: "image_url", image_url: { url } }));
  if (text) content.push({ type: "text", text });
  if (images.length) state.lastImage = images[images.length - 1];
  state.history.push({ role: "user", content });
  showUser(text, images);

  const view = assistantView();
  // skip_special_tokens false: the grounding tokens (<|box_start|>...) stay in the text, to draw boxes
  const body = { messages: state.history, stream: true, stream_options: { include_usage: true },
                 skip_special_tokens: false, max_tokens: Number($("max-tokens").value) || undefined,
                 temperature: Number($("temperature").value) };
  if (state.model) body.model = state.model;
  let raw = "", usage = null;
  setBusy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    if (!response.ok) {
      const detail = await response.json().catch(() => ({}));
      throw new Error((detail.error && detail.error.message) || `HTTP ${response.status}`);
    }
    await readEvents(response, (event) => {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      const delta = event.choices && event.choices[0] && event.choices[0].delta;
      if (delta && delta.content) {
        raw += delta.content;
        view.el.dataset.chunks = String(Number(view.el.dataset.chunks) + 1);
        view.update(raw);
      }
    });
    state.history.push({ role: "assistant", content: raw });
  } catch (err) {
    view.fail(String(err.message || err));
    state.history.pop();  // the question was not answered: do not send it again
  } finally {
    view.done(usage);
    setBusy(false);
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
}

// ----------------------------------------------------------------------------------- attachments

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren(...state.pending.map((url) => {
    const img = document.createElement("img");
    img.src = url;
    return img;
  }));
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

$("file").addEventListener("change", async (e) => {
  for (const file of e.target.files) state.pending.push(await readAsDataURL(file));
  e.target.value = "";
  renderAttachments();
  document.body.dataset.attached = String(state.pending.length);
});

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  if (state.busy) return;
  const text = $("prompt").value.trim();
  $("prompt").value = "";
  send(text);
});

$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});

$("clear").addEventListener("click", () => {
  state.history = [];
  state.lastImage = null;
  $("messages").replaceChildren();
});

fetch("/v1/models").then((r) => r.json()).then((list) => {
  state.model = list.data[0].id;
  $("model").textContent = `${state.model} · context ${list.data[0].max_model_len} tokens`;
}).catch(() => {});

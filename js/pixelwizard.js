// PixelWizard ComfyUI frontend extension: the browser glue. Logic lives in pixelwizard_logic.js (tested by node).
//  - HR sampler: choosing a preset fills width, height, steps and shift, and num_patches on connected decoders;
//    editing width/height/shift away from the preset switches it to "custom" (the node ignores them otherwise);
//    an info line shows the token count and the estimated peak VRAM of the HR stage. It depends on nodes
//    upstream (the anchor's frames, the loaders' precision and memory mode), so it is recomputed when a link or
//    a widget anywhere in the graph changes, and when a graph is loaded; never while drawing.
//  - Anchor Load: shows the anchor's prompt, seed and size: read from the file's safetensors header (through
//    ComfyUI's /view) as soon as an anchor is picked, and from the node's ui text after it runs. A file that is
//    not there yet (the anchors a workflow's step 1 will save) says so instead of showing the 404.
//  - Anchor Save / Decode to Video: show the file they wrote.
// Links are read through the node API (isInputConnected, getInputNode), not the deprecated input.link.
import { api } from "../../scripts/api.js";
import { app } from "../../scripts/app.js";
import {
  AUTO_MEMORY, DEFAULT_FRAMES, anchorFromMetadata, anchorMissingText, anchorSummary, anchorViewPath,
  estimatedMemoryMode, framesAfterCut, hrSummary, parseAnchorText, presetAfterEdit, presetValues,
  safetensorsHeaderLength, safetensorsMetadata, uiText,
} from "./pixelwizard_logic.js";

const HR = "PixelWizardHRSampler";
const DECODERS = new Set(["PixelWizardDecodeToVideo", "PixelWizardTiledDecode"]);
const INFO = "pixelwizard_info";
const DEFAULT_SWAP_BLOCKS = 10; // pixelwizard_core/pipeline/handles.py: swap_blocks 0 means this

const widget = (node, name) => node.widgets?.find((w) => w.name === name);

/** A read-only text area under the node's widgets; never saved in widgets_values nor sent to the server. */
function infoWidget(node) {
  let w = widget(node, INFO);
  if (w) return w;
  const el = document.createElement("div");
  Object.assign(el.style, {
    font: "11px monospace", color: "var(--descrip-text, #999)", overflow: "hidden", padding: "2px 4px",
    pointerEvents: "none",
  });
  if (typeof node.addDOMWidget !== "function") return null; // very old frontends: no display, nothing breaks
  w = node.addDOMWidget(INFO, "pixelwizard_info", el, {
    serialize: false, hideOnZoom: true, getValue: () => el.pwText ?? "", setValue: () => {},
    getMinHeight: () => 40,
  });
  w.serialize = false; // both spellings: node.serialize() reads the widget's, graphToPrompt the options'
  w.pwElement = el;
  return w;
}

function showLines(node, lines) {
  const w = infoWidget(node);
  if (!w) return;
  const text = lines.join("\n");
  const el = w.pwElement;
  if (el.pwText === text) return;
  el.pwText = text;
  el.replaceChildren?.(...lines.map((line) => {
    const row = document.createElement("div"); // one line each, cut with an ellipsis rather than wrapped
    Object.assign(row.style, { whiteSpace: "nowrap", overflow: "hidden", textOverflow: "ellipsis" });
    row.textContent = line;
    row.title = line;
    return row;
  }));
  node.setDirtyCanvas?.(true, false);
}

/** Whether input slot `index` of `node` has a link (through the node API; input.link is deprecated). */
function isConnected(node, index) {
  if (typeof node.isInputConnected === "function") return node.isInputConnected(index);
  return node.getInputLink?.(index) != null;
}

function inputNode(node, name) {
  const index = node.inputs?.findIndex((i) => i.name === name) ?? -1;
  return index >= 0 && isConnected(node, index) ? node.getInputNode(index) : null;
}

/** Frames of the anchor feeding `node` (its frame count is the HR video's): {frames, known}. */
function anchorFrames(node, depth = 0) {
  const source = depth < 8 ? inputNode(node, "anchor") : null;
  if (!source) return { frames: DEFAULT_FRAMES, known: false };
  const frames = widget(source, "frames");
  if (frames && typeof frames.value === "number") return { frames: frames.value, known: true };
  if (source.pwAnchor) return { frames: source.pwAnchor.frames, known: true };
  if (source.type === "PixelWizardAnchorFromVideo") {
    const cut = inputNode(source, "frames");
    const length = cut && widget(cut, "length");
    if (length) return { frames: framesAfterCut(length.value), known: false };
  }
  return anchorFrames(source, depth + 1);
}

/** Every node upstream of `node` (its ancestors), to find the loaders a run with this node uses. */
function ancestors(node) {
  const seen = new Set();
  const stack = [node];
  while (stack.length) {
    const current = stack.pop();
    (current.inputs ?? []).forEach((_, index) => {
      const up = isConnected(current, index) ? current.getInputNode(index) : null;
      if (up && up !== node && !seen.has(up)) {
        seen.add(up);
        stack.push(up);
      }
    });
  }
  return [...seen];
}

/** Precision of the HR model, which other models stay on the GPU, and whether a loader says "auto". */
function memorySetup(node) {
  const hrLoader = inputNode(node, "hr_model");
  const value = (n, name, fallback) => widget(n, name)?.value ?? fallback;
  const mode = (n) => estimatedMemoryMode(value(n, "memory_mode", AUTO_MEMORY));
  const resident = [];
  const upstream = ancestors(node);
  const lrCheckpoint = upstream.find((n) => n !== hrLoader && n.type === "PixelWizardCheckpointLoader");
  const loaders = upstream.filter((n) => n.type === "PixelWizardWanLoader" || n === lrCheckpoint || n === hrLoader);
  for (const n of loaders) {
    if (mode(n) !== "gpu") continue;
    if (n.type === "PixelWizardWanLoader") resident.push("text", "vae", ...(lrCheckpoint ? [] : ["lr"]));
    if (n === lrCheckpoint) resident.push("lr");
  }
  const swapping = hrLoader && mode(hrLoader) === "block_swap";
  const swapBlocks = swapping ? Math.min(value(hrLoader, "swap_blocks", 0) || DEFAULT_SWAP_BLOCKS, 30) : 0;
  const auto = loaders.some((n) => value(n, "memory_mode", AUTO_MEMORY) === AUTO_MEMORY);
  return { precision: hrLoader ? value(hrLoader, "precision", "bf16") : "bf16", resident, swapBlocks, auto };
}

function refreshHR(node) {
  const get = (name) => widget(node, name)?.value;
  const { frames, known } = anchorFrames(node);
  const { precision, resident, swapBlocks, auto } = memorySetup(node);
  const summary = hrSummary({
    preset: get("preset"), width: get("width"), height: get("height"), frames, framesKnown: known,
    precision: ["bf16", "fp16", "fp32", "fp8"].includes(precision) ? precision : "bf16", resident, swapBlocks, auto,
  });
  showLines(node, summary.lines);
}

// The HR samplers alive in the page. Their info line depends on the graph upstream, so any change to a link or a
// widget value marks them stale; one refresh runs after the current event (many changes, e.g. while a graph
// loads, give one refresh).
const hrNodes = new Set();
let refreshQueued = false;

function refreshAllHR() {
  refreshQueued = false;
  for (const node of hrNodes) {
    if (!node.graph) hrNodes.delete(node); // removed from its graph
    else refreshHR(node);
  }
}

function graphChanged() {
  if (refreshQueued || !hrNodes.size) return;
  refreshQueued = true;
  queueMicrotask(refreshAllHR);
}

/** Every node: a change of its links or of a widget value may change an HR sampler's info line. */
function watchNode(node) {
  chain(node, "onConnectionsChange", graphChanged);
  chain(node, "onWidgetChanged", graphChanged);
  for (const w of node.widgets ?? []) {
    if (w.name !== INFO) chain(w, "callback", graphChanged);
  }
}

function setValue(node, name, value) {
  const w = widget(node, name);
  if (w && w.value !== value) w.value = value;
}

function applyPreset(node) {
  const values = presetValues(widget(node, "preset")?.value);
  if (!values) return;
  for (const name of ["width", "height", "steps", "shift"]) setValue(node, name, values[name]);
  for (const decoder of node.getOutputNodes?.(0) ?? []) {
    if (DECODERS.has(decoder.type)) {
      setValue(decoder, "num_patches", values.num_patches);
      decoder.setDirtyCanvas?.(true, false);
    }
  }
}

function chain(object, method, after) {
  const original = object[method];
  object[method] = function (...args) {
    const result = original?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

function setupHR(nodeType) {
  chain(nodeType.prototype, "onNodeCreated", function () {
    const node = this;
    hrNodes.add(node);
    const preset = widget(node, "preset");
    chain(preset, "callback", () => { applyPreset(node); refreshHR(node); });
    for (const name of ["width", "height", "shift"]) {
      const w = widget(node, name);
      if (!w) continue;
      chain(w, "callback", () => {
        const next = presetAfterEdit(preset.value, {
          width: widget(node, "width").value, height: widget(node, "height").value, shift: widget(node, "shift").value,
        });
        if (next !== preset.value) preset.value = next;
        refreshHR(node);
      });
    }
    chain(widget(node, "steps") ?? {}, "callback", () => refreshHR(node));
    refreshHR(node);
  });
  chain(nodeType.prototype, "onConfigure", function () { refreshHR(this); });
  chain(nodeType.prototype, "onConnectionsChange", function () { refreshHR(this); });
  chain(nodeType.prototype, "onRemoved", function () { hrNodes.delete(this); });
}

function refreshDownstreamHR(node) {
  for (const target of node.getOutputNodes?.(0) ?? []) {
    if (target.type === HR) refreshHR(target);
  }
  graphChanged(); // HR samplers further down (through other nodes)
}

function showAnchor(node, info, fallback = "") {
  node.pwAnchor = info;
  showLines(node, info ? anchorSummary(info) : fallback ? [fallback] : []);
  refreshDownstreamHR(node);
}

async function readRange(path, end) {
  const response = await api.fetchApi(path, { headers: { Range: `bytes=0-${end}` } });
  if (response.status === 404) return null;
  if (!response.ok) throw new Error(`could not read the anchor (${response.status} for ${path})`);
  return new Uint8Array(await response.arrayBuffer());
}

/** Read the picked anchor's header (a few KB, not the latent) and show what it holds. */
async function loadAnchorInfo(node) {
  const choice = widget(node, "anchor")?.value;
  node.pwChoice = choice;
  const path = anchorViewPath(choice);
  if (!path) return showAnchor(node, null);
  try {
    let bytes = await readRange(path, 65535);
    if (bytes === null) {
      if (node.pwChoice === choice) showAnchor(node, null, anchorMissingText(choice));
      return;
    }
    const length = safetensorsHeaderLength(bytes);
    if (length !== null && length > bytes.byteLength) bytes = (await readRange(path, length - 1)) ?? bytes;
    const info = anchorFromMetadata(safetensorsMetadata(bytes));
    if (node.pwChoice === choice) showAnchor(node, info, info ? "" : `${choice}: not a PixelWizard anchor`);
  } catch (error) {
    if (node.pwChoice === choice) showAnchor(node, null, `${choice}: ${error.message}`);
  }
}

function setupAnchorLoad(nodeType) {
  chain(nodeType.prototype, "onNodeCreated", function () {
    const node = this;
    chain(widget(node, "anchor") ?? {}, "callback", () => loadAnchorInfo(node));
    loadAnchorInfo(node);
  });
  chain(nodeType.prototype, "onConfigure", function () { loadAnchorInfo(this); });
  chain(nodeType.prototype, "onExecuted", function (message) {
    const info = parseAnchorText(uiText(message));
    const known = this.pwAnchor; // from the header: the same anchor keeps its full prompt (the ui text cuts it)
    const same = info && known && ["seed", "width", "height", "frames"].every((k) => known[k] === info[k]);
    showAnchor(this, same ? known : info, uiText(message));
  });
}

function setupFileReport(nodeType, label) {
  chain(nodeType.prototype, "onExecuted", function (message) {
    const text = uiText(message);
    if (text) showLines(this, [`${label}: ${text}`]);
  });
}

// The frontend's change tracker announces every change it records (undo/redo, paste, edits of any kind).
api.addEventListener?.("graphChanged", graphChanged);

app.registerExtension({
  name: "PixelWizard.ui",
  nodeCreated(node) {
    watchNode(node);
  },
  afterConfigureGraph() {
    graphChanged();
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name === HR) setupHR(nodeType);
    else if (nodeData.name === "PixelWizardAnchorLoad") setupAnchorLoad(nodeType);
    else if (nodeData.name === "PixelWizardAnchorSave") setupFileReport(nodeType, "saved");
    else if (nodeData.name === "PixelWizardDecodeToVideo") setupFileReport(nodeType, "wrote output");
  },
});

// Tests of the browser glue js/pixelwizard.js against fake LiteGraph nodes (no browser needed).
import assert from "node:assert/strict";
import { register } from "node:module";
import { test } from "node:test";

register("./fake_app_hooks.mjs", import.meta.url);
globalThis.document = {
  createElement: () => ({ style: {}, textContent: "", children: [], replaceChildren(...rows) { this.children = rows; } }),
};
const { app } = await import("./fake_app.mjs");
const { api } = await import("./fake_api.mjs");
await import("../pixelwizard.js");
const [extension] = app.extensions;

// Reading input.link is deprecated in the current frontend: the fake inputs refuse it, so the glue must go
// through isInputConnected / getInputNode.
function fakeInput(name) {
  return Object.defineProperty({ name }, "link", {
    get() { throw new Error(`input.link read on ${name}: use node.isInputConnected / node.getInputLink`); },
  });
}

class FakeNode {
  constructor(type, widgets = {}, inputs = []) {
    this.type = type;
    this.graph = {};
    this.widgets = Object.entries(widgets).map(([name, value]) => ({ name, value, callback: undefined }));
    this.inputs = inputs.map(fakeInput);
    this.outputs = [{ name: "out", links: [] }];
    this.upstream = {};
    this.downstream = [];
    extension.nodeCreated?.(this); // what the frontend calls for every node it creates
  }
  isInputConnected(index) { return this.upstream[this.inputs[index]?.name] != null; }
  getInputNode(index) { return this.upstream[this.inputs[index].name] ?? null; }
  getOutputNodes() { return this.downstream; }
  addDOMWidget(name, type, element, options) {
    const w = { name, type, element, options, value: "" };
    this.widgets.push(w);
    return w;
  }
  setDirtyCanvas() {}
  widget(name) { return this.widgets.find((w) => w.name === name); }
  info() { return this.widget("pixelwizard_info")?.pwElement.pwText ?? ""; }
  /** The user picks a value: the frontend sets it, then calls the widget's callback and onWidgetChanged. */
  change(name, value) {
    const w = this.widget(name);
    const old = w.value;
    w.value = value;
    w.callback?.(value);
    this.onWidgetChanged?.(name, value, old, w);
  }
}

function connect(from, to, input) {
  if (!to.inputs.some((i) => i.name === input)) to.inputs.push(fakeInput(input));
  to.upstream[input] = from;
  from.downstream.push(to);
  to.onConnectionsChange?.();
}

const settle = () => new Promise((resolve) => setTimeout(resolve, 10));

async function nodeClass(name) {
  const type = class extends FakeNode {};
  await extension.beforeRegisterNodeDef(type, { name });
  return type;
}

async function graph() {
  const HR = await nodeClass("PixelWizardHRSampler");
  const Load = await nodeClass("PixelWizardAnchorLoad");
  const hr = new HR("PixelWizardHRSampler",
    { preset: "2k", width: 2560, height: 1440, steps: 4, shift: 5.5, cfg: 5, seed: 1, solver: "unipc" },
    ["hr_model", "anchor", "conditioning"]);
  const load = new Load("PixelWizardAnchorLoad", { anchor: "output/none.safetensors" });
  const ckpt = new FakeNode("PixelWizardCheckpointLoader", { checkpoint: "PixelWizard/2k/model.pt", stage: "hr",
    precision: "bf16", attention: "auto", memory_mode: "offload", swap_blocks: 0 });
  const decoder = new FakeNode("PixelWizardDecodeToVideo", { num_patches: 3, patch_dim: "w" }, ["wan", "latent"]);
  hr.onNodeCreated();
  load.onNodeCreated?.();
  connect(ckpt, hr, "hr_model");
  connect(load, hr, "anchor");
  connect(hr, decoder, "latent");
  await settle();
  return { hr, load, ckpt, decoder };
}

test("the extension registers under a PixelWizard name", () => {
  assert.equal(app.extensions.length, 1);
  assert.match(extension.name, /^PixelWizard\./);
});

test("choosing a preset fills the sampler and the connected decoder", async () => {
  const { hr, decoder } = await graph();
  hr.widget("preset").value = "4k";
  hr.widget("preset").callback("4k");
  const values = ["width", "height", "steps", "shift"].map((n) => hr.widget(n).value);
  assert.deepEqual(values, [3840, 2144, 4, 5.8]);
  assert.equal(decoder.widget("num_patches").value, 4);
  assert.match(hr.info(), /3840x2144 · 121 frames\? · 249,240 tokens/);
  assert.match(hr.info(), /peak VRAM ≈ \d+\.\d GiB/);
});

test("editing the width leaves the preset for custom", async () => {
  const { hr } = await graph();
  hr.widget("width").value = 1920;
  hr.widget("width").callback(1920);
  assert.equal(hr.widget("preset").value, "custom");
  assert.match(hr.info(), /^1920x1440 · /);
});

test("the info line is never saved nor sent to the server", async () => {
  const { hr } = await graph();
  const info = hr.widget("pixelwizard_info");
  assert.equal(info.serialize, false);
  assert.equal(info.options.serialize, false);
  assert.equal(hr.widgets.at(-1), info, "appended after the node's own widgets, so positions do not shift");
});

test("anchor load shows prompt, seed and size, and the HR sampler takes its frame count", async () => {
  const { hr, load } = await graph();
  load.onExecuted({ text: ["a fox in snow | seed 7 | 448x256, 81 frames"] });
  assert.equal(load.info(), "prompt: a fox in snow\nseed 7 · 448x256 · 81 frames");
  assert.match(hr.info(), /2560x1440 · 81 frames · 75,600 tokens/);
});

test("keeping the base models on the GPU raises the HR estimate", async () => {
  const { hr, load } = await graph();
  const gib = () => Number(/≈ ([\d.]+) GiB/.exec(hr.info())[1]);
  const alone = gib();
  const wan = new FakeNode("PixelWizardWanLoader", { precision: "bf16", memory_mode: "gpu" });
  connect(wan, load, "wan");
  await settle();
  assert.ok(gib() - alone > 10, `${alone} -> ${gib()}`); // umT5-XXL (11.4 GB) + VAE stay resident
  assert.match(hr.info(), /others kept on GPU/);
});

test("a widget changed upstream refreshes the info line, without any drawing", async () => {
  const HR = await nodeClass("PixelWizardHRSampler");
  assert.equal(HR.prototype.onDrawForeground, undefined, "nothing is recomputed per frame");
  const { hr, load } = await graph();
  const wan = new FakeNode("PixelWizardWanLoader", { precision: "bf16", memory_mode: "offload" });
  connect(wan, load, "wan");
  await settle();
  const before = hr.info();
  wan.change("memory_mode", "gpu"); // two nodes up: the loader feeds Anchor Load, which feeds the sampler
  assert.equal(hr.info(), before, "refreshed once, after the event");
  await settle();
  assert.notEqual(hr.info(), before);
  assert.match(hr.info(), /others kept on GPU/);
});

test("memory mode auto is estimated as offload (ComfyUI's normal VRAM mode), and the line says so", async () => {
  const { hr, ckpt } = await graph();
  const offload = hr.info().split("\n")[1];
  ckpt.change("memory_mode", "auto");
  await settle();
  const [, line] = hr.info().split("\n");
  assert.equal(line.replace("auto counted as offload", "others offloaded"), offload);
  const wan = new FakeNode("PixelWizardWanLoader", { precision: "bf16", memory_mode: "auto" });
  connect(wan, hr, "conditioning");
  await settle();
  assert.match(hr.info(), /auto counted as offload/);
});

test("block swap on the HR checkpoint loader lowers the HR estimate by the swapped blocks", async () => {
  const { hr, ckpt } = await graph();
  const gib = () => Number(/≈ ([\d.]+) GiB/.exec(hr.info())[1]);
  const offload = gib();
  ckpt.change("memory_mode", "block_swap");
  ckpt.change("swap_blocks", 20);
  await settle();
  // 18 blocks of 163,656,704 bf16 parameters leave the GPU (20 swapped, 2 in flight): 5.5 GiB
  assert.ok(Math.abs(offload - gib() - 5.49) < 0.11, `${offload} -> ${gib()}`);
});

test("each info line is its own row, cut with an ellipsis instead of wrapping", async () => {
  const { hr } = await graph();
  const rows = hr.widget("pixelwizard_info").pwElement.children;
  assert.equal(rows.length, 2);
  assert.equal(rows.map((r) => r.textContent).join("\n"), hr.info());
  assert.equal(rows[0].style.textOverflow, "ellipsis");
});

function anchorFile(metadata) {
  const json = new TextEncoder().encode(JSON.stringify({ __metadata__: metadata }));
  const bytes = new Uint8Array(8 + json.length + 16);
  new DataView(bytes.buffer).setBigUint64(0, BigInt(json.length), true);
  bytes.set(json, 8);
  return bytes;
}

test("picking an anchor reads its header and shows it before anything runs", async () => {
  const prompt = "a heron lifts off a misty lake ".repeat(3000); // a header over 64 KiB: read in two requests
  const path = "/view?filename=heron.safetensors&type=input&subfolder=pixelwizard%2Fanchors";
  api.files[path] = anchorFile({ "pixelwizard.kind": "pixelwizard.anchor", prompt: JSON.stringify(prompt), seed: "5",
    width: "448", height: "256", frames: "81", steps: "50", model: JSON.stringify("lr.pt:1") });
  const { hr, load } = await graph();
  api.requests.length = 0;
  load.widget("anchor").value = "input/heron.safetensors";
  load.widget("anchor").callback("input/heron.safetensors");
  await settle();
  assert.equal(api.requests.length, 2);
  assert.equal(api.requests[0].range, "bytes=0-65535");
  assert.equal(api.requests[1].range, `bytes=0-${api.files[path].length - 16 - 1}`);
  assert.match(load.info(), /^prompt: a heron lifts off/);
  assert.match(load.info(), /seed 5 · 448x256 · 81 frames$/);
  assert.match(hr.info(), /2560x1440 · 81 frames · 75,600 tokens/);
  // after a run the ui text confirms it; the header's full prompt is kept (the ui text is cut at 80 chars)
  load.onExecuted({ text: [`${prompt.slice(0, 80)} | seed 5 | 448x256, 81 frames`] });
  assert.equal(load.pwAnchor.prompt, prompt);
});

test("a file that is not an anchor, or is not there yet, says so", async () => {
  const { load } = await graph();
  api.files["/view?filename=x.safetensors&type=output&subfolder=pixelwizard%2Fanchors"] = anchorFile({ other: "1" });
  load.widget("anchor").value = "output/x.safetensors";
  load.widget("anchor").callback();
  await settle();
  assert.equal(load.info(), "output/x.safetensors: not a PixelWizard anchor");
  // before a first run the anchor the workflow names is not saved yet: no raw "404 for /view..."
  load.widget("anchor").value = "output/anchor_seed101.safetensors";
  load.widget("anchor").callback();
  await settle();
  assert.equal(load.info(), "not saved yet: queue step 1");
  load.widget("anchor").value = "input/shared.safetensors";
  load.widget("anchor").callback();
  await settle();
  assert.equal(load.info(), "not in input/pixelwizard/anchors: copy it there");
});

// Tests of js/pixelwizard_logic.js (node --test; run from pytest by tests/test_js.py).
import assert from "node:assert/strict";
import { test } from "node:test";
import {
  AUTO_MEMORY, CUSTOM, GIB, HR_PRESETS, MEMORY, anchorMissingText, anchorSummary, ditActivationBytes, effectiveSize,
  estimateStages, estimatedMemoryMode, framesAfterCut, hrSummary, latentFrames, parseAnchorText, presetAfterEdit, presetValues, tokenCount, uiText, weightBytes,
} from "../pixelwizard_logic.js";

test("token counts of the reference sizes", () => {
  assert.equal(latentFrames(121), 31);
  assert.equal(latentFrames(1), 1);
  assert.equal(tokenCount(448, 256, 121), 3472);
  assert.equal(tokenCount(2560, 1440, 121), 111600);
  assert.equal(tokenCount(3840, 2144, 121), 249240);
  assert.equal(tokenCount(2560, 1440, 81), 21 * 45 * 80);
});

test("a preset fills width, height, steps, shift and the decoder's patches", () => {
  assert.deepEqual(presetValues("2k"), { width: 2560, height: 1440, steps: 4, shift: 5.5, num_patches: 3 });
  assert.deepEqual(presetValues("4k"), { width: 3840, height: 2144, steps: 4, shift: 5.8, num_patches: 4 });
  assert.equal(presetValues(CUSTOM), null);
  const values = presetValues("2k");
  values.width = 1; // a copy: the table itself cannot be changed by a caller
  assert.equal(HR_PRESETS["2k"].width, 2560);
});

test("editing a size away from the preset switches to custom, matching values keep it", () => {
  assert.equal(presetAfterEdit("2k", { width: 2560, height: 1440, shift: 5.5 }), "2k");
  assert.equal(presetAfterEdit("2k", { width: 1920, height: 1440, shift: 5.5 }), CUSTOM);
  assert.equal(presetAfterEdit("4k", { width: 3840, height: 2144, shift: 6.0 }), CUSTOM);
  assert.equal(presetAfterEdit(CUSTOM, { width: 2560, height: 1440, shift: 5.5 }), CUSTOM);
  assert.deepEqual(effectiveSize("4k", 64, 64), { width: 3840, height: 2144 });
  assert.deepEqual(effectiveSize(CUSTOM, 1920, 1088), { width: 1920, height: 1088 });
});

test("weights follow the parameter counts and precisions", () => {
  assert.equal(weightBytes("lr", "bf16"), 2 * MEMORY.DIT_PARAMS);
  assert.equal(weightBytes("hr", "fp32"), 4 * (MEMORY.DIT_PARAMS + MEMORY.HR_DT_PARAMS + MEMORY.HR_ADAPTER_PARAMS));
  assert.equal(weightBytes("lr", "fp8"), 2 * MEMORY.DIT_PARAMS - MEMORY.DIT_BLOCK_LINEAR_PARAMS);
  assert.equal(weightBytes("vae", "bf16", "bf16"), 2 * MEMORY.VAE_PARAMS);
  assert.throws(() => weightBytes("hr", "int3"), /precision/);
  assert.throws(() => weightBytes("clip"), /role/);
});

test("the HR stage grows with tokens; keeping other models on the GPU adds their weights", () => {
  const offload = estimateStages({ width: 2560, height: 1440 });
  const resident = estimateStages({ width: 2560, height: 1440, resident: ["text", "lr", "vae"] });
  assert.equal(offload.hr, weightBytes("hr") + ditActivationBytes(111600));
  assert.equal(resident.hr - offload.hr, weightBytes("text") + weightBytes("lr") + weightBytes("vae"));
  const fourK = estimateStages({ width: 3840, height: 2144 });
  assert.equal(fourK.hr - offload.hr, (249240 - 111600) * (MEMORY.DIT_BYTES_PER_TOKEN + MEMORY.SAMPLER_BYTES_PER_TOKEN));
  // the LR stage batches both CFG branches over 3,472 tokens
  assert.equal(offload.anchor,
    weightBytes("lr") + 2 * 3472 * MEMORY.DIT_BYTES_PER_TOKEN + MEMORY.DIT_CHUNK_BYTES
      + 3472 * MEMORY.SAMPLER_BYTES_PER_TOKEN);
  assert.ok(offload.hr / GIB > 10 && offload.hr / GIB < 100);
});

test("the HR summary shows the tokens and the VRAM of the sampled size", () => {
  const s = hrSummary({ preset: "4k", width: 64, height: 64, frames: 121 });
  assert.equal(s.tokens, 249240);
  assert.match(s.lines[0], /^3840x2144 · 121 frames · 249,240 tokens$/);
  assert.match(s.lines[1], /^peak VRAM ≈ \d+\.\d GiB \(est\.; others offloaded\)$/);
  assert.match(hrSummary({ preset: "custom", width: 1280, height: 704, frames: 121, framesKnown: false }).lines[0],
    /121 frames\? · 27,280 tokens/);
});

test("memory mode auto is estimated as offload, and the info line says so", () => {
  assert.equal(estimatedMemoryMode(AUTO_MEMORY), "offload");
  for (const mode of ["gpu", "offload", "block_swap"]) assert.equal(estimatedMemoryMode(mode), mode);
  const base = { preset: "2k", width: 2560, height: 1440, frames: 121 };
  const auto = hrSummary({ ...base, auto: true });
  assert.equal(auto.hrBytes, hrSummary(base).hrBytes);
  assert.match(auto.lines[1], /^peak VRAM ≈ \d+\.\d GiB \(est\.; auto counted as offload\)$/);
  assert.match(hrSummary({ ...base, auto: true, resident: ["text"] }).lines[1], /others kept on GPU/);
});

test("an anchor that is not there yet says what to do, not the 404", () => {
  assert.equal(anchorMissingText("output/anchor_seed101.safetensors"), "not saved yet: queue step 1");
  assert.equal(anchorMissingText("input/mine.safetensors"), "not in input/pixelwizard/anchors: copy it there");
});

test("the anchor loader's ui text is parsed from the right", () => {
  const info = parseAnchorText("a fox | in snow | seed 42 | 448x256, 121 frames");
  assert.deepEqual(info, { prompt: "a fox | in snow", seed: 42, width: 448, height: 256, frames: 121 });
  assert.deepEqual(parseAnchorText(" | seed 0 | 64x32, 1 frame"), { prompt: "", seed: 0, width: 64, height: 32, frames: 1 });
  assert.equal(parseAnchorText("output/anchor_seed1.safetensors"), null);
  assert.equal(parseAnchorText(undefined), null);
  assert.deepEqual(anchorSummary(info), ["prompt: a fox | in snow", "seed 42 · 448x256 · 121 frames"]);
  assert.deepEqual(anchorSummary(null), []);
  assert.equal(uiText({ text: ["a", "b"] }), "a\nb");
  assert.equal(uiText({}), "");
});

test("frames after the 4k+1 cut", () => {
  assert.equal(framesAfterCut(121), 121);
  assert.equal(framesAfterCut(150), 149);
  assert.equal(framesAfterCut(4), 1);
  assert.equal(framesAfterCut(0), null);
});

test("an anchor's metadata is read from the safetensors header", async () => {
  const { anchorFromMetadata, anchorViewPath, safetensorsHeaderLength, safetensorsMetadata } = await import("../pixelwizard_logic.js");
  const meta = { "pixelwizard.kind": "pixelwizard.anchor", prompt: JSON.stringify("a fox | snow"), seed: "101",
    width: "448", height: "256", frames: "121", steps: "50", model: JSON.stringify("model.pt:123") };
  const json = new TextEncoder().encode(JSON.stringify({ __metadata__: meta, latent: { dtype: "F32", shape: [1], data_offsets: [0, 4] } }));
  const file = new Uint8Array(8 + json.length + 4);
  new DataView(file.buffer).setBigUint64(0, BigInt(json.length), true);
  file.set(json, 8);
  assert.equal(safetensorsHeaderLength(file.subarray(0, 8)), 8 + json.length);
  assert.equal(safetensorsMetadata(file.subarray(0, 20)), null, "a cut header is not parsed");
  assert.deepEqual(anchorFromMetadata(safetensorsMetadata(file)),
    { prompt: "a fox | snow", seed: 101, width: 448, height: 256, frames: 121, steps: 50, model: "model.pt:123" });
  assert.equal(anchorFromMetadata({ ...meta, "pixelwizard.kind": "pixelwizard.hr_latent" }), null);
  assert.equal(anchorFromMetadata({ ...meta, seed: "oops" }), null);
  assert.equal(safetensorsHeaderLength(new Uint8Array(4)), null);
  assert.equal(anchorViewPath("output/anchor_seed1"),
    "/view?filename=anchor_seed1.safetensors&type=output&subfolder=pixelwizard%2Fanchors");
  assert.equal(anchorViewPath("output/anchor_seed1.safetensors"), anchorViewPath("output/anchor_seed1"));  // older workflows
  assert.equal(anchorViewPath("input/x.safetensors").includes("type=input"), true);
  assert.equal(anchorViewPath("temp/x.safetensors"), null);
  assert.equal(anchorViewPath("output/../x.safetensors"), null);
  assert.equal(anchorViewPath("output/.."), null);
});

// PixelWizard frontend logic: presets, token counts, the peak-VRAM estimate and the anchor's ui text.
// Plain ES module with no browser imports, so Node's test runner tests it (js/tests/*.test.mjs).
//
// Kept in step with the Python side by tests/test_js.py:
//   HR_PRESETS          <- pixelwizard_core/pipeline/presets.py HR_PRESETS
//   MEMORY + estimate*  <- pixelwizard_core/doctor.py estimate_memory (formula documented in BENCHMARKS.md,
//                          "Peak memory estimate"); the test runs this file under node and compares.

export const HR_PRESETS = Object.freeze({
  "2k": Object.freeze({ width: 2560, height: 1440, steps: 4, shift: 5.5, num_patches: 3 }),
  "4k": Object.freeze({ width: 3840, height: 2144, steps: 4, shift: 5.8, num_patches: 4 }),
});
export const CUSTOM = "custom";
export const DEFAULT_FRAMES = 121; // the reference's video length; the HR video has the anchor's frames
export const LR_SIZE = Object.freeze({ width: 448, height: 256 });
const TOKEN_PIXELS = 32; // one DiT token: 16x16 px of VAE latent times the 2x2 patch

/** Latent frames of a 4k+1-frame video (the VAE packs 4 frames per latent frame). */
export function latentFrames(frames) {
  return Math.floor((frames - 1) / 4) + 1;
}

/** DiT tokens of a video: latent frames x (H/32) x (W/32); 111,600 at 2K and 249,240 at 4K (121 frames). */
export function tokenCount(width, height, frames = DEFAULT_FRAMES) {
  return latentFrames(frames) * Math.floor(height / TOKEN_PIXELS) * Math.floor(width / TOKEN_PIXELS);
}

/** Widget values a preset sets on the HR sampler (and num_patches on its decoder); null for "custom". */
export function presetValues(preset) {
  const p = HR_PRESETS[preset];
  return p ? { ...p } : null;
}

/** The preset to show after the user edits width, height or shift: "custom" once they leave the preset. */
export function presetAfterEdit(preset, { width, height, shift }) {
  const p = HR_PRESETS[preset];
  if (!p) return preset;
  const same = p.width === width && p.height === height && Math.abs(p.shift - shift) < 1e-6;
  return same ? preset : CUSTOM;
}

/** The size the HR sampler will really sample: the preset's, or the widgets' with "custom". */
export function effectiveSize(preset, width, height) {
  const p = HR_PRESETS[preset];
  return p ? { width: p.width, height: p.height } : { width, height };
}

// ---------------------------------------------------------------------------------------- memory
// A mirror of pixelwizard_core/doctor.py (see the header): weights of each model as the loader places them,
// plus the measured activations of one DiT forward. Keep the numbers identical to pixelwizard_core/pipeline/memory.py.
export const GIB = 2 ** 30;
export const MEMORY = Object.freeze({
  DIT_PARAMS: 4_999_787_712,
  DIT_BLOCK_LINEAR_PARAMS: 4_907_335_680, // stored in 1 byte with "fp8"
  DIT_BLOCKS: 30,
  DIT_BLOCK_PARAMS: 163_656_704, // one block: what block swap keeps off the GPU per block
  HR_DT_PARAMS: 10_229_760, // dt embedding, in the DiT's precision
  HR_ADAPTER_PARAMS: 93_649_152, // anchor injector, kept in float32
  T5_PARAMS: 5_680_910_336,
  VAE_PARAMS: 704_688_668,
  DIT_BYTES_PER_TOKEN: 51_200, // one lean DiT forward, batch 1, bf16 (measured)
  DIT_CHUNK_BYTES: 536_870_912, // one token chunk's FFN work, once per forward
  SAMPLER_BYTES_PER_TOKEN: 4_608, // the sampling loop's float32 latents (counted)
  T5_ACTIVATION_BYTES: 536_870_912,
  PRECISION_BYTES: Object.freeze({ bf16: 2, fp16: 2, fp32: 4, fp8: 2 }),
});

/** Bytes of a model's weights on the GPU: role "lr" | "hr" | "text" | "vae". */
export function weightBytes(role, precision = "bf16", vaePrecision = "fp32") {
  const m = MEMORY;
  const size = m.PRECISION_BYTES[precision];
  if (size === undefined) throw new Error(`unknown precision ${precision}`);
  if (role === "lr" || role === "hr") {
    let dit = m.DIT_PARAMS * size;
    if (precision === "fp8") dit -= m.DIT_BLOCK_LINEAR_PARAMS;
    return dit + (role === "hr" ? m.HR_DT_PARAMS * size + m.HR_ADAPTER_PARAMS * 4 : 0);
  }
  if (role === "text") return m.T5_PARAMS * size;
  if (role === "vae") return m.VAE_PARAMS * m.PRECISION_BYTES[vaePrecision];
  throw new Error(`unknown model role ${role}`);
}

/** DiT weight bytes block swap keeps off the GPU: the swapped blocks less the two in flight on the GPU. */
export function blockSwapSavings(swapBlocks, precision = "bf16") {
  const m = MEMORY;
  const linear = Math.floor(m.DIT_BLOCK_LINEAR_PARAMS / m.DIT_BLOCKS);
  const size = m.PRECISION_BYTES[precision];
  const block = linear * (precision === "fp8" ? 1 : size) + (m.DIT_BLOCK_PARAMS - linear) * size;
  return (swapBlocks - Math.min(swapBlocks, 2)) * block;
}

/** Working memory of a sampling stage: one DiT forward over batch x tokens, plus the loop's latents. */
export function ditActivationBytes(tokens, batch = 1) {
  return batch * tokens * MEMORY.DIT_BYTES_PER_TOKEN + MEMORY.DIT_CHUNK_BYTES + tokens * MEMORY.SAMPLER_BYTES_PER_TOKEN;
}

/**
 * Estimated peak GPU memory (bytes) of the text, anchor and HR stages of one run.
 *
 * `resident` names the models that stay on the GPU between stages (memory mode "gpu"); the others are moved
 * to the CPU when their stage ends ("offload"). All four resident equals the memory profile "gpu", none its
 * "offload" mode. The LR stage runs both CFG branches in one batch, the HR stage one branch at a time.
 * `swapBlocks`: DiT blocks streamed from the CPU (memory mode "block_swap"), for both DiTs.
 * The tiled decode is left out: with the reference's tiles it needs less than the HR stage.
 */
export function estimateStages({
  width, height, frames = DEFAULT_FRAMES, precision = "bf16", vaePrecision = "fp32",
  resident = [], lrWidth = LR_SIZE.width, lrHeight = LR_SIZE.height, swapBlocks = 0,
} = {}) {
  const textPrecision = precision === "fp8" ? "bf16" : precision;
  const swapped = blockSwapSavings(swapBlocks, precision);
  const weights = {
    text: weightBytes("text", textPrecision),
    lr: weightBytes("lr", precision) - swapped,
    hr: weightBytes("hr", precision) - swapped,
    vae: weightBytes("vae", precision, vaePrecision),
  };
  const held = (role) => Object.keys(weights).filter((r) => r !== role && resident.includes(r))
    .reduce((sum, r) => sum + weights[r], 0);
  const work = {
    text: MEMORY.T5_ACTIVATION_BYTES,
    lr: ditActivationBytes(tokenCount(lrWidth, lrHeight, frames), 2),
    hr: ditActivationBytes(tokenCount(width, height, frames)),
  };
  return {
    text: weights.text + work.text + held("text"),
    anchor: weights.lr + work.lr + held("lr"),
    hr: weights.hr + work.hr + held("hr"),
  };
}

export function formatGiB(bytes) {
  return `${(bytes / GIB).toFixed(1)} GiB`;
}

// The loaders' memory modes: MEMORY_MODES of pixelwizard_core/pipeline/memory.py, plus the nodes' "auto", which
// follows ComfyUI's VRAM state (nodes/host.py memory_mode: --highvram -> gpu, --lowvram/--novram -> block_swap,
// otherwise offload). The browser does not know the server's VRAM state, so the estimate counts "auto" as
// "offload", ComfyUI's normal mode, and the info line says so.
export const AUTO_MEMORY = "auto";

/** The memory mode the estimate assumes for a loader's memory_mode choice. */
export function estimatedMemoryMode(choice) {
  return choice === AUTO_MEMORY ? "offload" : choice;
}

/** Where the other models are during the HR stage, as the info line says it. */
function othersNote(resident, auto) {
  if (resident.length) return "others kept on GPU";
  return auto ? "auto counted as offload" : "others offloaded";
}

/**
 * The HR sampler's info lines: tokens and the estimated peak VRAM of its stage.
 * `auto`: some loader upstream has memory_mode "auto" (counted as "offload", see estimatedMemoryMode).
 */
export function hrSummary({
  preset, width, height, frames, framesKnown = true, precision = "bf16", resident = [], swapBlocks = 0, auto = false,
}) {
  const size = effectiveSize(preset, width, height);
  const tokens = tokenCount(size.width, size.height, frames);
  const stages = estimateStages({ ...size, frames, precision, resident, swapBlocks });
  const framesNote = framesKnown ? `${frames} frames` : `${frames} frames?`; // "?": not known upstream, assumed
  return {
    tokens,
    hrBytes: stages.hr,
    lines: [
      `${size.width}x${size.height} · ${framesNote} · ${tokens.toLocaleString("en-US")} tokens`,
      `peak VRAM ≈ ${formatGiB(stages.hr)} (est.; ${othersNote(resident, auto)})`,
    ],
  };
}

// ---------------------------------------------------------------------------------------- anchors
// PixelWizard Anchor Load returns ui text "<prompt, up to 80 chars> | seed <N> | <W>x<H>, <F> frames".
// The prompt itself may contain " | ", so the fields are taken from the right.
const ANCHOR_TAIL = /^(?:(.*) )?\| seed (\d+) \| (\d+)x(\d+), (\d+) frames?$/s;

/** {prompt, seed, width, height, frames} from the anchor loader's ui text, or null if it does not match. */
export function parseAnchorText(text) {
  if (typeof text !== "string") return null;
  const match = ANCHOR_TAIL.exec(text.trimEnd());
  if (!match) return null;
  const [, prompt, seed, width, height, frames] = match;
  return { prompt: prompt ?? "", seed: Number(seed), width: Number(width), height: Number(height), frames: Number(frames) };
}

/** Lines shown on the anchor loader after it ran. */
export function anchorSummary(info) {
  if (!info) return [];
  return [
    `prompt: ${info.prompt || "(none)"}`,
    `seed ${info.seed} · ${info.width}x${info.height} · ${info.frames} frames`,
  ];
}

/** The text of a node's ui output ({text: [...]}) as one string, or "" when there is none. */
export function uiText(message) {
  const text = message?.text;
  if (Array.isArray(text)) return text.join("\n");
  return typeof text === "string" ? text : "";
}

/** Frames a video of `count` input frames gives after the 4k+1 cut (as Anchor from Video does). */
export function framesAfterCut(count) {
  return count >= 1 ? Math.floor((count - 1) / 4) * 4 + 1 : null;
}

// Anchor files are safetensors: 8 bytes little-endian header length N, then N bytes of JSON whose
// "__metadata__" holds the anchor's settings, each value JSON-encoded (pixelwizard_core/io/latents.py).
// Reading just the header lets the loader show an anchor as soon as it is picked, before anything runs.
export const ANCHOR_FOLDER = "pixelwizard/anchors";
export const ANCHOR_KIND = "pixelwizard.anchor";

/**
 * What Anchor Load shows when its file is not there (ComfyUI's /view answers 404): before a first run, the
 * anchor a workflow names in output/ is written by its step 1 (Anchor Save); one in input/ is copied there.
 */
export function anchorMissingText(choice) {
  return /^input\//.test(choice ?? "") ? `not in input/${ANCHOR_FOLDER}: copy it there` : "not saved yet: queue step 1";
}

/** /view URL (with its query) of an Anchor Load choice such as "output/x" (listed without the file suffix;
 * older workflows saved "output/x.safetensors"), or null. */
export function anchorViewPath(choice) {
  const match = /^(input|output)\/([^/\\]+?)(\.safetensors)?$/.exec(choice ?? "");
  if (!match || match[2] === "." || match[2] === "..") return null;
  const query = new URLSearchParams({ filename: `${match[2]}.safetensors`, type: match[1], subfolder: ANCHOR_FOLDER });
  return `/view?${query}`;
}

/** Bytes of the safetensors header (length prefix included) given the first 8 bytes; null if not one. */
export function safetensorsHeaderLength(bytes) {
  if (!bytes || bytes.byteLength < 8) return null;
  const n = new DataView(bytes.buffer ?? bytes, bytes.byteOffset ?? 0, 8).getBigUint64(0, true);
  return n > 0n && n < 100_000_000n ? 8 + Number(n) : null;
}

/** The "__metadata__" object of a safetensors file from its first bytes (header included), or null. */
export function safetensorsMetadata(bytes) {
  const length = safetensorsHeaderLength(bytes);
  if (length === null || bytes.byteLength < length) return null;
  const view = new Uint8Array(bytes.buffer ?? bytes, bytes.byteOffset ?? 0, length);
  try {
    return JSON.parse(new TextDecoder().decode(view.subarray(8)))?.__metadata__ ?? null;
  } catch {
    return null;
  }
}

/** {prompt, seed, width, height, frames, steps, model} of an anchor's metadata; null if it is not an anchor. */
export function anchorFromMetadata(metadata) {
  if (!metadata || metadata["pixelwizard.kind"] !== ANCHOR_KIND) return null;
  const value = (key) => {
    try {
      return JSON.parse(metadata[key]);
    } catch {
      return undefined;
    }
  };
  const info = { prompt: value("prompt") ?? "", seed: value("seed"), width: value("width"), height: value("height"),
    frames: value("frames"), steps: value("steps"), model: value("model") };
  return [info.seed, info.width, info.height, info.frames].every(Number.isInteger) ? info : null;
}

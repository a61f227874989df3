// Loads each example workflow in the real ComfyUI frontend (headless Chromium through playwright-core) and
// reports what the user would see: every node's box after the frontend has sized it, group title bars, text
// that is cut (ellipsis in the canvas, overflowing DOM text) and nodes smaller than their widgets need.
// Run by tests/test_comfyui_frontend.py; usable on its own against a running ComfyUI:
//
//   node tests/comfyui_frontend_check.cjs --url http://127.0.0.1:8188 --workflows workflows --out /tmp/fe \
//        [--modes classic,vue] [--chromium /usr/bin/chromium] [--thumbnails DIR]
//
// Writes OUT/report.json ({frontend_version, modes: {mode: {workflow: {...}}}}) and a screenshot per workflow
// and mode; with --thumbnails, DIR/<workflow>.jpg: the whole graph in the classic canvas, fitted to a square
// (`--modes none --thumbnails workflows` retakes the committed thumbnails and checks nothing).
// Environment: PLAYWRIGHT_CORE = the playwright-core package directory when `require` cannot find it.
"use strict";
const fs = require("fs");
const path = require("path");

const args = Object.fromEntries(process.argv.slice(2).reduce((pairs, arg, i, all) => {
  if (arg.startsWith("--")) pairs.push([arg.slice(2), all[i + 1] && !all[i + 1].startsWith("--") ? all[i + 1] : "1"]);
  return pairs;
}, []));
const URL = args.url ?? "http://127.0.0.1:8188";
const WORKFLOWS = args.workflows ?? path.join(__dirname, "..", "workflows");
const OUT = args.out ?? "frontend_check";
const MODES = (args.modes ?? "classic,vue").split(",").filter((m) => m && m !== "none");
const CHROMIUM = args.chromium ?? process.env.CHROMIUM ?? "/usr/bin/chromium";
const THUMBS = args.thumbnails;
const ONLY = args.only ? new Set(args.only.split(",")) : null;
const INTERACT = args.interact ?? "text_to_2k_video"; // the workflow whose HR info line is driven through the UI
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const SETTINGS = { // a returning user: no template browser at start, no minimap over the canvas
  "Comfy.TutorialCompleted": true, "Comfy.Minimap.Visible": false, "Comfy.Graph.CanvasInfo": false,
};

/** In the page: hooks that record the text drawn on the canvas for each node (to find ellipses). */
function installHooks() {
  if (window.__pw) return;
  const canvas = app.canvas;
  const proto = Object.getPrototypeOf(canvas);
  window.__pw = { node: null, texts: null };
  const fillText = CanvasRenderingContext2D.prototype.fillText;
  CanvasRenderingContext2D.prototype.fillText = function (text, x, y, ...rest) {
    if (window.__pw.texts && this.canvas === canvas.canvas) {
      // where the text lands, in canvas units (badges are drawn outside the node's own rectangle)
      const m = this.measureText(String(text));
      const t = this.getTransform();
      const ratio = window.devicePixelRatio || 1;
      const { scale, offset } = canvas.ds;
      const corner = (px, py) => [(t.a * px + t.c * py + t.e) / ratio / scale - offset[0],
        (t.b * px + t.d * py + t.f) / ratio / scale - offset[1]];
      const [left, top] = corner(x - m.actualBoundingBoxLeft, y - m.actualBoundingBoxAscent);
      const [right, bottom] = corner(x + m.actualBoundingBoxRight, y + m.actualBoundingBoxDescent);
      window.__pw.texts.push([window.__pw.node?.id ?? null, String(text), [left, top, right - left, bottom - top]]);
    }
    return fillText.call(this, text, x, y, ...rest);
  };
  const drawNode = proto.drawNode;
  proto.drawNode = function (node, ...rest) {
    const previous = window.__pw.node;
    window.__pw.node = node;
    try {
      return drawNode.call(this, node, ...rest);
    } finally {
      window.__pw.node = previous;
    }
  };
}

/** In the page: load a workflow with a setting for the rendering mode; returns load errors. */
async function loadWorkflow({ data, name, vue }) {
  const setting = app.extensionManager.setting;
  if (setting.get("Comfy.VueNodes.Enabled") !== vue) await setting.set("Comfy.VueNodes.Enabled", vue);
  const thrown = [];
  try {
    await app.loadGraphData(structuredClone(data), true, true, name);
  } catch (error) {
    thrown.push(String(error?.stack ?? error));
  }
  return thrown;
}

/** In the page: the text of every dialog shown (e.g. the frontend's "missing models" warning after a load). */
function openDialogs() {
  return [...document.querySelectorAll(".p-dialog, [role='dialog']")]
    .filter((e) => e.getClientRects().length > 0)
    .map((e) => e.innerText.trim().replace(/\s+/g, " "))
    .filter(Boolean);
}

/** Close the dialogs a load opened (their close buttons, then Escape), so the next measurement sees the graph. */
async function closeDialogs(page) {
  await page.evaluate(() => document.querySelectorAll(".p-dialog-close-button, [aria-label='Close']").forEach((b) => b.click()));
  await page.keyboard.press("Escape");
  await sleep(300);
}

/** In the page: the graph's bounds (nodes with title bars, groups) in canvas units. */
function graphBounds() {
  const TH = LiteGraph.NODE_TITLE_HEIGHT;
  let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
  const add = (x, y, w, h) => { x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h); };
  for (const n of app.graph.nodes) add(n.pos[0], n.pos[1] - TH, n.size[0], n.size[1] + TH);
  for (const g of app.graph.groups) add(...g._bounding);
  return [x0, y0, x1 - x0, y1 - y0];
}

/** In the page: show the canvas point [x, y] at the top-left of the canvas at `scale`, and redraw. */
function placeView({ x, y, scale }) {
  const ds = app.canvas.ds;
  ds.scale = scale;
  ds.offset[0] = -x;
  ds.offset[1] = -y;
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
}

/** In the page: every node's box, group title bars and every sign of cut text, in canvas units. */
function measure({ vue }) {
  const TH = LiteGraph.NODE_TITLE_HEIGHT;
  const nodes = app.graph.nodes;
  const result = { nodes: [], groups: [], cut: [], clipped: [] };
  const label = (n) => `${n.id}:${n.title || n.type}`;

  // text on the canvas: the frontend ends what does not fit with an ellipsis ("…" drawn apart, or "...")
  window.__pw.texts = [];
  app.canvas.draw(true, true);
  const drawn = window.__pw.texts;
  window.__pw.texts = null;
  const extent = new Map(); // node id -> the box of everything drawn for it
  for (const [id, text, box] of drawn) {
    if (id == null) continue;
    if (text.trim() && box.every(Number.isFinite)) {
      const [x, y, w, h] = box;
      const e = extent.get(id) ?? [x, y, x + w, y + h];
      extent.set(id, [Math.min(e[0], x), Math.min(e[1], y), Math.max(e[2], x + w), Math.max(e[3], y + h)]);
    }
    if (["…", "‥", "․"].includes(text) || /(\.\.\.|…)$/.test(text)) {
      const n = app.graph.getNodeById(id);
      result.cut.push(`${label(n)}: canvas text cut: ${JSON.stringify(text)}`);
    }
  }

  // DOM text (DOM widgets in both modes, the whole node in Nodes 2.0): an element whose content is larger
  // than its box while it hides or scrolls the rest
  let short = 0; // the most any text area of the node lacks in height (to size a node that holds prompts)
  const overflowing = (root, where) => {
    for (const el of [root, ...root.querySelectorAll("*")]) {
      if (el.tagName === "TEXTAREA") short = Math.max(short, el.scrollHeight - el.clientHeight);
      if (!el.clientWidth && !el.clientHeight) continue;
      const style = getComputedStyle(el);
      if (style.display === "none" || style.visibility === "hidden") continue;
      const text = (el.value ?? el.innerText ?? "").trim();
      if (!text) continue;
      const hides = (o) => ["hidden", "auto", "scroll", "clip"].includes(o);
      const wide = hides(style.overflowX) && el.scrollWidth > el.clientWidth + 1;
      const tall = hides(style.overflowY) && el.scrollHeight > el.clientHeight + 1;
      if (wide || tall) {
        result.cut.push(`${where}: ${el.tagName.toLowerCase()} ${wide ? `${el.scrollWidth} > ${el.clientWidth} px wide` : ""}` +
          `${wide && tall ? ", " : ""}${tall ? `${el.scrollHeight} > ${el.clientHeight} px tall` : ""}: ` +
          JSON.stringify(text.slice(0, 60)));
      }
    }
  };

  for (const n of nodes) {
    let box;
    short = 0;
    const el = vue ? document.querySelector(`[data-node-id="${n.id}"]`) : null;
    if (vue && el) {
      box = [n.pos[0], n.pos[1] - TH, el.offsetWidth, el.offsetHeight];
      overflowing(el, label(n));
    } else {
      box = [n.pos[0], n.pos[1] - TH, n.size[0], n.size[1] + TH];
      if (n.collapsed) box = [n.pos[0], n.pos[1] - TH, n._collapsed_width ?? n.size[0], TH];
      const e = extent.get(n.id);
      if (e) { // grown by the text drawn outside it (the node source badge above the title bar)
        const [x0, y0] = [Math.min(box[0], e[0]), Math.min(box[1], e[1])];
        box = [x0, y0, Math.max(box[0] + box[2], e[2]) - x0, Math.max(box[1] + box[3], e[3]) - y0];
      }
      const need = n.computeSize?.();
      if (need && (n.size[0] + 1 < need[0] || n.size[1] + 1 < need[1]))
        result.clipped.push(`${label(n)}: ${n.size.map(Math.round).join("x")} < the ${need.map(Math.round).join("x")} its widgets need`);
      for (const w of n.widgets ?? []) {
        const element = w.element ?? w.inputEl;
        if (element?.isConnected) overflowing(element, `${label(n)} widget ${w.name}`);
      }
    }
    result.nodes.push({ id: n.id, type: n.type, title: n.title, box: box.map((v) => Math.round(v * 10) / 10),
      size: n.size.map((v) => Math.round(v * 10) / 10), mode: n.mode, need: n.computeSize?.().map(Math.ceil),
      textarea_short: short });
  }

  const ctx = app.canvas.ctx;
  for (const g of app.graph.groups) {
    const [x, y, w, h] = g._bounding;
    const padding = g.constructor.padding ?? 4;
    ctx.save();
    ctx.font = `${g.font_size}px ${LiteGraph.GROUP_FONT}`;
    const textWidth = ctx.measureText(g.title).width;
    ctx.restore();
    if (textWidth + 2 * padding > w) result.cut.push(`group ${JSON.stringify(g.title)}: title ${Math.round(textWidth)} px in ${w} px`);
    result.groups.push({ title: g.title, box: [x, y, w, h], title_box: [x, y, w, g.titleHeight] });
  }
  return result;
}

/** Problems in a measurement: overlapping nodes, nodes over group titles or across a group's edge. */
function problems(m) {
  const out = [...m.cut, ...m.clipped];
  const inter = (a, b) => [Math.min(a[0] + a[2], b[0] + b[2]) - Math.max(a[0], b[0]),
    Math.min(a[1] + a[3], b[1] + b[3]) - Math.max(a[1], b[1])];
  const name = (n) => `${n.id}:${n.title || n.type}`;
  for (let i = 0; i < m.nodes.length; i++) {
    for (let j = i + 1; j < m.nodes.length; j++) {
      const [dx, dy] = inter(m.nodes[i].box, m.nodes[j].box);
      if (dx > 0 && dy > 0) out.push(`${name(m.nodes[i])} overlaps ${name(m.nodes[j])} (${Math.round(dx)}x${Math.round(dy)} px)`);
    }
  }
  for (const g of m.groups) {
    for (const n of m.nodes) {
      const [tx, ty] = inter(n.box, g.title_box);
      if (tx > 0 && ty > 0) out.push(`${name(n)} covers the title of group ${JSON.stringify(g.title)}`);
      const [dx, dy] = inter(n.box, g.box);
      const inside = dx >= n.box[2] && dy >= n.box[3];
      if (dx > 0 && dy > 0 && !inside) out.push(`${name(n)} sticks out of group ${JSON.stringify(g.title)}`);
    }
  }
  return out;
}

/** In the page: count what the extension does to the graph (stack frames in pixelwizard*.js): reads of the
 *  deprecated input.link, and calls of the link API (isInputConnected, getInputNode, getInputLink). */
function instrumentLinks() {
  const OURS = /\/pixelwizard(_logic)?\.js/;
  const ours = () => OURS.test(new Error().stack);
  // a read is ours when the nearest frame below the getter that is ours or the link API is ours: the frontend's
  // own reads inside isInputConnected / getInputNode do not count (Vue's proxies add frames in between)
  const API = /\b(isInputConnected|getInputNode|getInputLink)\b/;
  const directlyOurs = () => {
    for (const line of new Error().stack.split("\n").slice(2)) {
      if (API.test(line)) return false;
      if (OURS.test(line)) return true;
    }
    return false;
  };
  const counts = window.__pw.counts = { link_reads: 0, api_calls: 0 };
  for (const node of app.graph.nodes) {
    for (const input of node.inputs ?? []) {
      let value = input.link;
      Object.defineProperty(input, "link", {
        configurable: true, enumerable: true,
        get() { if (directlyOurs()) counts.link_reads++; return value; },
        set(v) { value = v; },
      });
    }
  }
  if (!window.__pw.apiWrapped) {
    window.__pw.apiWrapped = true;
    let proto = Object.getPrototypeOf(app.graph.nodes[0]);
    while (proto && !Object.prototype.hasOwnProperty.call(proto, "getInputNode")) proto = Object.getPrototypeOf(proto);
    for (const name of ["isInputConnected", "getInputNode", "getInputLink"]) {
      const original = proto[name];
      if (typeof original !== "function") continue;
      proto[name] = function (...args) {
        if (ours()) window.__pw.counts.api_calls++;
        return original.apply(this, args);
      };
    }
  }
}

/** In the page: redraw the canvas on every animation frame for `ms`; returns the counts over that time. */
async function idleFrames(ms) {
  const counts = window.__pw.counts;
  const start = { ...counts };
  const end = performance.now() + ms;
  let frames = 0;
  await new Promise((resolve) => {
    const tick = () => {
      app.canvas.setDirty(true, true);
      frames++;
      if (performance.now() < end) requestAnimationFrame(tick); else resolve();
    };
    requestAnimationFrame(tick);
  });
  return { frames, link_reads: counts.link_reads - start.link_reads, api_calls: counts.api_calls - start.api_calls };
}

function infoText(id) {
  const w = app.graph.getNodeById(id)?.widgets?.find((x) => x.name === "pixelwizard_info");
  return w?.pwElement?.pwText ?? null;
}

/**
 * Change the HR checkpoint loader's memory_mode to block_swap the way a user does (a click on the widget, then
 * on the choice, in either rendering mode) and check that the HR sampler's info line follows, that nothing is
 * recomputed while the canvas only redraws, and that input.link is never read.
 */
async function interact(page, mode) {
  const ids = await page.evaluate(() => {
    const hr = app.graph.nodes.find((n) => n.type === "PixelWizardHRSampler");
    const index = hr.inputs.findIndex((i) => i.name === "hr_model");
    return { hr: hr.id, loader: hr.getInputNode(index).id };
  });
  await page.evaluate(instrumentLinks);
  const before = await page.evaluate(infoText, ids.hr);
  const idle = await page.evaluate(idleFrames, 1500);
  if (mode === "vue") {
    const node = page.locator(`[data-node-id="${ids.loader}"]`);
    const label = await node.getByText("memory_mode", { exact: true }).first().boundingBox();
    await page.mouse.click(label.x + label.width + 60, label.y + label.height / 2);
    await page.locator('[role="option"]', { hasText: "block_swap" }).first().click();
  } else {
    const point = await page.evaluate((id) => {
      const n = app.graph.getNodeById(id);
      const w = n.widgets.find((x) => x.name === "memory_mode");
      const { scale, offset } = app.canvas.ds;
      const r = app.canvas.canvas.getBoundingClientRect();
      const y = n.pos[1] + (w.y ?? w.last_y) + (w.computedHeight ?? LiteGraph.NODE_WIDGET_HEIGHT) / 2;
      return [r.x + (n.pos[0] + n.size[0] / 2 + offset[0]) * scale, r.y + (y + offset[1]) * scale];
    }, ids.loader);
    await page.mouse.click(point[0], point[1]);
    await page.locator(".litemenu-entry", { hasText: "block_swap" }).first().click();
  }
  await sleep(500);
  const after = await page.evaluate(infoText, ids.hr);
  const value = await page.evaluate((id) => app.graph.getNodeById(id).widgets.find((x) => x.name === "memory_mode").value, ids.loader);
  const counts = await page.evaluate(() => ({ ...window.__pw.counts }));
  const out = { before, after, value, idle, counts, problems: [] };
  if (value !== "block_swap") out.problems.push(`the click did not set memory_mode (${value})`);
  if (!after || after === before) out.problems.push(`the HR info line did not follow the loader: ${JSON.stringify(after)}`);
  if (idle.api_calls || idle.link_reads) out.problems.push(`the extension walked the graph while the canvas only redrew (${idle.frames} frames): ${JSON.stringify(idle)}`);
  if (counts.link_reads) out.problems.push(`the extension read the deprecated input.link ${counts.link_reads} times`);
  if (!counts.api_calls) out.problems.push("no link API call seen after the change (instrumentation broken?)");
  return out;
}

/**
 * THUMBS/<workflow>.jpg for each workflow: the whole graph as the classic canvas draws it (focus mode, nothing
 * selected, full detail: the level-of-detail switch is turned off while they are taken), fitted in a square
 * of `side` pixels (the template browser shows square cards), under 100 KB.
 */
async function thumbnails(page, files) {
  fs.mkdirSync(THUMBS, { recursive: true });
  const side = Number(args.side ?? 768);
  const margin = 40;
  const LOD = "LiteGraph.Canvas.MinFontSizeForLOD";
  const lod = await page.evaluate(async (LOD) => {
    const setting = app.extensionManager.setting;
    const previous = setting.get(LOD);
    await setting.set(LOD, 0);
    await setting.set("Comfy.VueNodes.Enabled", false);
    if (!app.extensionManager.focusMode) await app.extensionManager.command.execute("Workspace.ToggleFocusMode");
    return previous;
  }, LOD);
  try {
    for (const file of files) {
      const name = file.replace(/\.json$/, "");
      const data = JSON.parse(fs.readFileSync(path.join(WORKFLOWS, file), "utf8"));
      await page.evaluate(loadWorkflow, { data, name, vue: false });
      await settle(page);
      const [x, y, w, h] = await page.evaluate(graphBounds);
      const square = Math.max(w, h) + 2 * margin;
      const scale = side / square;
      await page.setViewportSize({ width: side + 480, height: side + 320 }); // canvas controls outside the square
      await page.evaluate(() => {
        app.canvas.deselectAll?.();
        // a still of the graph, not of this server's state: no red outline where a file is missing here (the
        // anchors pick_an_anchor saves in its step 1)
        for (const n of app.graph.nodes) n.has_errors = false;
      });
      await page.mouse.move(side + 470, side + 310);
      const view = { x: x - (square - w) / 2, y: y - (square - h) / 2, scale };
      await page.evaluate(placeView, view);
      await settle(page);
      await page.evaluate(placeView, view);
      await sleep(500);
      const origin = await page.evaluate(() => { const r = app.canvas.canvas.getBoundingClientRect(); return [r.x, r.y]; });
      const target = path.join(THUMBS, `${name}.jpg`);
      let quality = 90;
      for (;;) {
        await page.screenshot({ path: target, type: "jpeg", quality, clip: { x: origin[0], y: origin[1], width: side, height: side } });
        if (fs.statSync(target).size < 95 * 1024 || quality <= 40) break;
        quality -= 10;
      }
      console.log(`thumbnail ${target}: ${fs.statSync(target).size} bytes, quality ${quality}`);
    }
  } finally {
    await page.evaluate(async ({ LOD, lod }) => { await app.extensionManager.setting.set(LOD, lod); }, { LOD, lod });
  }
}

async function settle(page) {
  // sizes are final when two readings 400 ms apart agree (DOM widgets and Vue nodes size themselves late)
  let last = "";
  for (let i = 0; i < 25; i++) {
    await sleep(400);
    const now = await page.evaluate(() => JSON.stringify(app.graph.nodes.map((n) => [n.id, n.pos, n.size,
      document.querySelector(`[data-node-id="${n.id}"]`)?.offsetHeight ?? 0])));
    if (now === last) return;
    last = now;
  }
}

(async () => {
  fs.mkdirSync(OUT, { recursive: true });
  await fetch(`${URL}/settings`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(SETTINGS) });
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox", "--disable-gpu", "--font-render-hinting=none"] });
  const report = { url: URL, frontend_version: null, modes: {}, console: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
    page.on("pageerror", (e) => report.console.push(`pageerror: ${e.message}`));
    page.on("console", (m) => { if (m.type() === "error" && /pixelwizard/i.test(m.text())) report.console.push(`console: ${m.text()}`); });
    await page.goto(URL, { waitUntil: "load" });
    await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.app?.extensionManager?.setting &&
      window.LiteGraph?.registered_node_types?.PixelWizardHRSampler, null, { timeout: 120000 });
    await sleep(1000);
    await page.keyboard.press("Escape");
    const info = await page.evaluate(() => ({
      version: window.__COMFYUI_FRONTEND_VERSION__ ?? null,
      vue: app.extensionManager.setting.get("Comfy.VueNodes.Enabled") !== undefined,
    }));
    report.frontend_version = info.version;
    report.has_vue_nodes = info.vue;
    await page.evaluate(installHooks);
    const files = fs.readdirSync(WORKFLOWS).filter((f) => f.endsWith(".json")).sort()
      .filter((f) => !ONLY || ONLY.has(f.replace(/\.json$/, "")));
    for (const mode of MODES) {
      if (mode === "vue" && !info.vue) { report.modes.vue = null; continue; }
      const results = report.modes[mode] = {};
      for (const file of files) {
        const name = file.replace(/\.json$/, "");
        const data = JSON.parse(fs.readFileSync(path.join(WORKFLOWS, file), "utf8"));
        const thrown = await page.evaluate(loadWorkflow, { data, name, vue: mode === "vue" });
        await settle(page);
        // a dialog on load (missing models, missing nodes) is a problem of the workflow on a complete install
        const dialogs = await page.evaluate(openDialogs);
        if (dialogs.length) await closeDialogs(page);
        // nodes the frontend outlined in red on load: its missing-model scan takes any combo value with a model
        // file suffix for a model (the Errors tab then lists it)
        const flagged = await page.evaluate(() => app.graph.nodes.filter((n) => n.has_errors).map((n) => `${n.id} ${n.type}`));
        // the whole graph at scale 1 in a viewport that holds it, so every DOM widget is shown and measured
        const [x, y, w, h] = await page.evaluate(graphBounds);
        const canvasBox = await page.evaluate(() => { const r = app.canvas.canvas.getBoundingClientRect(); return [r.x, r.y]; });
        await page.setViewportSize({ width: Math.ceil(canvasBox[0] + w + 200), height: Math.ceil(canvasBox[1] + h + 200) });
        await page.evaluate(placeView, { x: x - 60, y: y - 60, scale: 1 });
        await settle(page);
        await page.evaluate(placeView, { x: x - 60, y: y - 60, scale: 1 });
        await sleep(300);
        const m = await page.evaluate(measure, { vue: mode === "vue" });
        m.thrown = thrown;
        m.dialogs = dialogs;
        m.flagged = flagged;
        m.problems = [...thrown, ...dialogs.map((text) => `dialog on load: ${text.slice(0, 300)}`),
          ...flagged.map((node) => `node ${node} flagged with an error on load (a missing model?)`), ...problems(m)];
        results[name] = m;
        await page.screenshot({ path: path.join(OUT, `${name}.${mode}.png`) });
        if (name === INTERACT) {
          m.interaction = await interact(page, mode);
          m.problems.push(...m.interaction.problems);
        }
        console.log(`${mode} ${name}: ${m.nodes.length} nodes, ${m.problems.length} problem(s)`);
        for (const p of m.problems) console.log(`  ${p}`);
      }
    }
    if (THUMBS) await thumbnails(page, files);
  } finally {
    await browser.close();
    fs.writeFileSync(path.join(OUT, "report.json"), JSON.stringify(report, null, 1));
  }
})().catch((error) => { console.error(error); process.exit(2); });

// Module resolve hook: the extension's imports of ComfyUI's app.js and api.js get the fakes beside this file.
const FAKES = { "/scripts/app.js": "./fake_app.mjs", "/scripts/api.js": "./fake_api.mjs" };

export async function resolve(specifier, context, next) {
  const fake = Object.keys(FAKES).find((suffix) => specifier.endsWith(suffix));
  if (fake) return { url: new URL(FAKES[fake], import.meta.url).href, shortCircuit: true };
  return next(specifier, context);
}

// Stand-in for ComfyUI's "../../scripts/app.js" in node tests: collects the registered extensions.
export const app = {
  extensions: [],
  registerExtension(extension) {
    this.extensions.push(extension);
  },
};

// Stand-in for ComfyUI's "../../scripts/api.js" in node tests: fetchApi serves the bytes of `api.files`.
export const api = {
  files: {},
  requests: [],
  async fetchApi(path, options = {}) {
    this.requests.push({ path, range: options.headers?.Range });
    const bytes = this.files[path];
    if (!bytes) return { ok: false, status: 404 };
    const end = Number(/bytes=0-(\d+)/.exec(options.headers?.Range ?? "")?.[1] ?? bytes.length - 1);
    return { ok: true, status: 206, arrayBuffer: async () => bytes.slice(0, end + 1).buffer };
  },
};

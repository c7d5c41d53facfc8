// Drives the real @eachlabs/aiflow SDK against llava-serve; prints one JSON line per result.
// Usage: node eachlabs.cjs <scenario>   env: LLAVA_BASE_URL, EACH_API_KEY, IMAGE
const Each = require("@eachlabs/aiflow");

const each = new Each({ auth: process.env.EACH_API_KEY, apiBaseUrl: `${process.env.LLAVA_BASE_URL}/v1` });
const input = (maxTokens) => ({
  image: process.env.IMAGE, prompt: "Are you allowed to swim here?",
  top_p: "1", max_tokens: String(maxTokens), temperature: "0.2",
});
const terminal = new Set(["success", "error", "cancelled"]);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const out = (obj) => process.stdout.write(`RESULT ${JSON.stringify(obj)}\n`);

async function poll(id) {
  for (;;) {
    const p = await each.prediction.get(id);
    if (terminal.has(p.status)) return p;
    await sleep(200);
  }
}

const scenarios = {
  async create_get() {
    const created = await each.prediction.create({ model: "llava-13b", version: "0.0.1", input: input(8) });
    out({ created, done: await poll(created.predictionID) });
  },
  async cancel() {
    const created = await each.prediction.create({ model: "llava-13b", version: "0.0.1", input: input(2048) });
    for (;;) {  // wait until it runs, then cancel it
      const p = await each.prediction.get(created.predictionID);
      if (p.status === "processing") break;
      await sleep(50);
    }
    const cancelled = await each.prediction.cancel(created.predictionID);
    out({ cancelled, done: await poll(created.predictionID) });
  },
  async run() {
    out({ done: await each.prediction.run({ model: "llava-13b", version: "0.0.1", input: input(4) }) });
  },
  async errors() {
    const failures = [];
    for (const call of [
      () => each.prediction.create({ model: "llava-13b", version: "0.0.1", input: { prompt: "no image" } }),
      () => each.prediction.get("no-such-prediction"),
    ]) {
      try { await call(); failures.push(null); } catch (e) { failures.push(e.message); }
    }
    out({ failures });
  },
};

scenarios[process.argv[2]]().catch((e) => { console.error(e); process.exit(1); });

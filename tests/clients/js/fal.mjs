// Drives the real @fal-ai/client SDK against llava-serve (docs/api.md §5.2); prints `RESULT <json>` lines.
// Usage: node fal.mjs <middleware|proxy> <scenario>   env: LLAVA_BASE_URL, FAL_KEY, IMAGE (a data: URI)
// Expected client errors are caught and recorded; the exit status is non-zero only when something
// unexpected was thrown (or the scenario ran past its deadline).
import { ApiError, ValidationError, createFalClient } from "@fal-ai/client";
import { copy, runScenario } from "./harness.mjs";

const [mode, scenario] = process.argv.slice(2);
for (const name of ["LLAVA_BASE_URL", "FAL_KEY", "IMAGE"]) {
  if (!process.env[name]) {
    console.error(`${name} is not set`);
    process.exit(2);
  }
}
const BASE = process.env.LLAVA_BASE_URL.replace(/\/+$/, "");
const APP = "fal-ai/llavav15-13b";
const DEADLINE_MS = 100_000;

const configs = {
  // §5.2(a): rewrite the hard-coded hosts; method, headers and body stay as the client made them.
  middleware: {
    requestMiddleware: async (req) => ({
      ...req,
      url: req.url
        .replace(/^https:\/\/queue\.fal\.run\//, `${BASE}/queue/`)
        .replace(/^https:\/\/fal\.run\//, `${BASE}/`),
    }),
  },
  // §5.2(b): every call goes to one URL with `x-fal-target-url: <original URL>`.
  proxy: { proxyUrl: { url: `${BASE}/api/fal/proxy`, when: "always" } },
};
if (!(mode in configs)) {
  console.error(`unknown mode ${mode}`);
  process.exit(2);
}
const fal = createFalClient({ credentials: process.env.FAL_KEY, ...configs[mode] });

const input = (maxNewTokens, extra = {}) => ({
  prompt: "Are you allowed to swim here?", image_url: process.env.IMAGE, max_new_tokens: maxNewTokens, ...extra,
});
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function describe(e) {
  const info = {
    name: e?.constructor?.name ?? typeof e,
    isApiError: e instanceof ApiError,
    isValidationError: e instanceof ValidationError,
    message: String(e?.message ?? e),
  };
  if (e instanceof ApiError) {
    Object.assign(info, { status: e.status, body: copy(e.body), requestId: e.requestId, timeoutType: e.timeoutType ?? null });
  }
  if (e instanceof ValidationError) info.fieldErrors = copy(e.fieldErrors);
  return info;
}

// A call that is expected (or allowed) to fail: {ok, value} or {ok: false, error}.
async function attempt(promise) {
  try {
    return { ok: true, value: copy(await promise) };
  } catch (e) {
    return { ok: false, error: describe(e) };
  }
}

// Record of onQueueUpdate calls. The streaming mode hands over its own (mutated) log array, so copy.
function updates() {
  const seen = [];
  return { seen, onQueueUpdate: (u) => seen.push(copy(u)) };
}

async function waitForStatus(rec, requestId, wanted, logs = false) {
  for (;;) {
    const s = await fal.queue.status(APP, { requestId, logs });
    rec.polled.push(s.status);
    if (wanted.includes(s.status)) return s;
    await sleep(50);
  }
}

const scenarios = {
  async run(rec) {
    Object.assign(rec, await fal.run(APP, { input: input(8) }));
  },

  async subscribe_polling(rec) {
    const u = updates();
    rec.updates = u.seen;
    const result = await fal.subscribe(APP, {
      input: input(8), logs: true, onEnqueue: (id) => { rec.enqueued = id; }, onQueueUpdate: u.onQueueUpdate,
    });
    Object.assign(rec, result);
  },

  async subscribe_streaming(rec) {
    const u = updates();
    rec.updates = u.seen;
    const result = await fal.subscribe(APP, {
      input: input(8), logs: true, mode: "streaming",
      onEnqueue: (id) => { rec.enqueued = id; }, onQueueUpdate: u.onQueueUpdate,
    });
    Object.assign(rec, result);
  },

  async stream(rec) {
    rec.events = [];
    const stream = await fal.stream(APP, { input: input(8) });
    // Take done() before iterating: an HTTP error rejects it while the loop runs (the iterator itself just
    // stops), and a rejection nobody has taken yet would kill the process before we could report it.
    const done = stream.done();
    done.catch(() => {});
    for await (const event of stream) rec.events.push(copy(event));
    rec.done = copy(await done);
    rec.requestId = stream.requestId;
  },

  async queue(rec) {
    rec.submitted = await fal.queue.submit(APP, { input: input(8) });
    const requestId = rec.submitted.request_id;
    rec.status = await fal.queue.status(APP, { requestId, logs: true });
    rec.completed = await fal.queue.subscribeToStatus(APP, { requestId, logs: true });
    rec.statusWithoutLogs = await fal.queue.status(APP, { requestId, logs: false });
    rec.result = await fal.queue.result(APP, { requestId });
  },

  async cancel(rec) {
    rec.polled = [];
    rec.submitted = await fal.queue.submit(APP, { input: input(2048) });
    const requestId = rec.submitted.request_id;
    rec.running = await waitForStatus(rec, requestId, ["IN_PROGRESS", "COMPLETED"]);
    rec.cancel = await attempt(fal.queue.cancel(APP, { requestId }));
    rec.final = await waitForStatus(rec, requestId, ["COMPLETED"], true);
    rec.result = await attempt(fal.queue.result(APP, { requestId }));
    rec.cancelAgain = await attempt(fal.queue.cancel(APP, { requestId }));
  },

  async validation(rec) {
    rec.noPrompt = await attempt(fal.run(APP, { input: { image_url: process.env.IMAGE, max_new_tokens: 8 } }));
    const u = updates();
    rec.updates = u.seen;
    rec.badImage = await attempt(fal.subscribe(APP, {
      input: input(8, { image_url: "http://127.0.0.1:9/nope.png" }), logs: true,
      onEnqueue: (id) => { rec.enqueued = id; }, onQueueUpdate: u.onQueueUpdate,
    }));
  },
};

await runScenario(scenarios, scenario, { mode, scenario }, describe, DEADLINE_MS);

// Drives the official `openai` SDK against llava-serve's OpenAI-compatible route; prints `RESULT <json>` lines.
// Usage: node openai.mjs <scenario>   env: LLAVA_BASE_URL, OPENAI_API_KEY, MODEL, IMAGE (a data: URI)
// The exit status is non-zero only when something unexpected was thrown (or the scenario ran past its deadline).
import OpenAI, { APIError } from "openai";
import { copy, runScenario } from "./harness.mjs";

const [scenario] = process.argv.slice(2);
for (const name of ["LLAVA_BASE_URL", "OPENAI_API_KEY", "MODEL", "IMAGE"]) {
  if (!process.env[name]) {
    console.error(`${name} is not set`);
    process.exit(2);
  }
}
const BASE = process.env.LLAVA_BASE_URL.replace(/\/+$/, "");
const MAX_TOKENS = 8;
const DEADLINE_MS = 100_000;

// What a user writes to point the SDK here: our base URL, our key. No retries: a failure shows as it is.
const openai = new OpenAI({ baseURL: `${BASE}/v1`, apiKey: process.env.OPENAI_API_KEY, maxRetries: 0 });

const request = (extra = {}) => ({
  model: process.env.MODEL,
  max_tokens: MAX_TOKENS,
  temperature: 0, // greedy: the test model's greedy tokens are one ASCII character each
  messages: [{
    role: "user",
    content: [
      { type: "image_url", image_url: { url: process.env.IMAGE } },
      { type: "text", text: "Are you allowed to swim here?" },
    ],
  }],
  ...extra,
});

function describe(e) {
  const info = {
    name: e?.constructor?.name ?? typeof e,
    isApiError: e instanceof APIError,
    message: String(e?.message ?? e),
  };
  if (e instanceof APIError) {
    Object.assign(info, { status: e.status ?? null, error: copy(e.error), requestId: e.requestID ?? null });
  }
  return info;
}

const scenarios = {
  async chat(rec) {
    rec.completion = copy(await openai.chat.completions.create(request()));
  },

  async stream(rec) {
    const stream = await openai.chat.completions.create(
      request({ stream: true, stream_options: { include_usage: true } }),
    );
    rec.chunks = [];
    for await (const chunk of stream) rec.chunks.push(copy(chunk));
    const choices = rec.chunks.flatMap((c) => c.choices ?? []);
    rec.content = choices.map((c) => c.delta?.content ?? "").join("");
    rec.finishReason = choices.map((c) => c.finish_reason).find((r) => r != null) ?? null;
    rec.usageChunk = rec.chunks.find((c) => c.usage != null) ?? null;
  },
};

await runScenario(scenarios, scenario, { scenario }, describe, DEADLINE_MS);

// What every ES-module client script shares: `RESULT <json>` lines for the Python tests, and one run of a
// named scenario under a deadline. The exit status is non-zero only when something unexpected was thrown
// (1), the scenario is unknown (2) or it ran past its deadline (3).
export const copy = (value) => (value === undefined ? null : JSON.parse(JSON.stringify(value)));
export const out = (obj) => process.stdout.write(`RESULT ${JSON.stringify(obj)}\n`);

export async function runScenario(scenarios, scenario, rec, describe, deadlineMs = 100_000) {
  if (!(scenario in scenarios)) {
    console.error(`unknown scenario ${scenario}`);
    process.exit(2);
  }
  setTimeout(() => {
    out({ ...rec, unexpected: { name: "Deadline", message: `scenario still running after ${deadlineMs} ms` } });
    process.exit(3);
  }, deadlineMs).unref();
  try {
    await scenarios[scenario](rec);
    out(rec);
  } catch (e) {
    out({ ...rec, unexpected: describe(e) });
    console.error(e);
    process.exit(1);
  }
}

/** Durations as users write them: "30m", "90s", "1h", "1h30m" or seconds (as in Python). */
import { InvalidArgument } from "./errors.js";

const UNITS: Record<string, number> = { ms: 0.001, s: 1, m: 60, h: 3600, d: 86400 };
const PART = /(\d+(?:\.\d+)?)(ms|s|m|h|d)/gy;

export type Duration = string | number;

export function parseDuration(value: Duration, what = "duration"): number {
  let seconds: number;
  if (typeof value === "number") {
    seconds = value;
  } else if (typeof value === "string") {
    const text = value.trim().toLowerCase();
    const asNumber = text === "" ? NaN : Number(text);
    if (!Number.isNaN(asNumber)) {
      seconds = asNumber;
    } else {
      seconds = 0;
      PART.lastIndex = 0;
      let pos = 0;
      for (let m = PART.exec(text); m !== null; m = PART.exec(text)) {
        seconds += Number(m[1]) * UNITS[m[2]!]!;
        pos = PART.lastIndex;
      }
      if (pos !== text.length || text === "") {
        throw new InvalidArgument(`invalid ${what}: ${JSON.stringify(value)}`, {
          hint: "use seconds or a duration such as 90s, 30m, 1h, 1h30m",
        });
      }
    }
  } else {
    throw new InvalidArgument(`invalid ${what}: ${String(value)}`);
  }
  if (!(seconds > 0) || !Number.isFinite(seconds)) {
    throw new InvalidArgument(`invalid ${what}: ${JSON.stringify(value)} (must be positive)`);
  }
  return seconds;
}

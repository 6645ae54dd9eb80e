// A minimal Multifrost v4 CHILD (worker) in Node.js, written from PROTOCOL.md.
//
// Spawn mode only: a ROUTER socket connects to tcp://127.0.0.1:$COMLINK_ZMQ_PORT, where the
// parent's DEALER is bound. Functions: add(a, b), echo(x), fail(msg), hello(name),
// list_functions(). Used by tests/test_node.py to check multifrost_trio's parent against a
// peer that shares none of its code.
//
// Usage: COMLINK_ZMQ_PORT=<port> node worker.mjs [--worker]

import { randomUUID } from "node:crypto";
import process from "node:process";

import { Packr, unpack } from "msgpackr";
import { Router } from "zeromq";

const APP = "comlink_ipc_v4";
const NAMESPACE = "default";
const MAX_DEPTH = 100;
const PPID_POLL_MS = 1000;

// Plain msgpack maps (no record extension); `undefined` travels as nil.
const packr = new Packr({ useRecords: false, encodeUndefinedAsNil: true });

// ------------------------------------------------------------------------------ values

/** Wall-clock seconds as a float; never integer-valued, so msgpackr packs it as float64. */
function now() {
  const seconds = Date.now() / 1000;
  return Number.isInteger(seconds) ? seconds + 1e-6 : seconds;
}

/**
 * Map a JS value onto the portable subset (PROTOCOL.md section 3): non-finite numbers and
 * undefined become nil; integers outside 32 bits become BigInt so they travel as msgpack
 * ints (msgpackr would pack a large integral Number as float64); Buffers stay bin.
 */
function toWire(value, depth = 0) {
  if (value === undefined || value === null) return null;
  switch (typeof value) {
    case "number":
      if (!Number.isFinite(value)) return null;
      if (Number.isSafeInteger(value) && (value < -(2 ** 31) || value >= 2 ** 32)) {
        return BigInt(value);
      }
      return value;
    case "bigint":
      if (value < -(2n ** 63n) || value >= 2n ** 63n) {
        throw new RangeError(`int ${value} is outside the int64 range and cannot be sent`);
      }
      return value;
    case "string":
    case "boolean":
      return value;
    case "object":
      break;
    default:
      throw new TypeError(`a value of type ${typeof value} cannot be sent`);
  }
  if (value instanceof Uint8Array) return Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  if (depth >= MAX_DEPTH) throw new RangeError(`value nested deeper than ${MAX_DEPTH} levels`);
  if (Array.isArray(value)) return value.map((item) => toWire(item, depth + 1));
  const out = {};
  for (const [key, item] of Object.entries(value)) out[key] = toWire(item, depth + 1);
  return out;
}

function toNumberPair(a, b) {
  // Ints beyond 32 bits arrive as BigInt; mixing BigInt and Number throws in JS.
  if (typeof a === "bigint" || typeof b === "bigint") {
    if (Number.isInteger(a) || typeof a === "bigint") a = BigInt(a);
    if (Number.isInteger(b) || typeof b === "bigint") b = BigInt(b);
  }
  return [a, b];
}

// ------------------------------------------------------------------------------ socket

const sock = new Router({ linger: 200 });
let sendChain = Promise.resolve();

/** zeromq.js allows one send at a time: queue them, in order. */
function send(identity, message) {
  const payload = packr.pack({ app: APP, id: message.id, type: message.type, timestamp: now(), ...message });
  sendChain = sendChain
    .then(() => sock.send([identity, "", payload]))
    .catch((err) => process.stderr.write(`node worker: send failed: ${err}\n`));
  return sendChain;
}

function errorText(err) {
  if (!(err instanceof Error)) return `Error: ${String(err)}\n`;
  const header = `${err.name}: ${err.message}`;
  let stack = typeof err.stack === "string" ? err.stack : "";
  if (stack.startsWith(header)) stack = stack.slice(header.length).replace(/^\n/, "");
  return `${header}\n${stack}`;
}

// ------------------------------------------------------------------------------ functions

const functions = {
  add(a, b) {
    [a, b] = toNumberPair(a, b);
    return a + b;
  },
  echo(x) {
    return x;
  },
  fail(msg) {
    throw new Error(msg);
  },
  async hello(identity, name) {
    await send(identity, { id: randomUUID(), type: "stdout", output: `hi ${name}\n` });
    return `hello ${name}`;
  },
  list_functions() {
    return Object.keys(functions).sort();
  },
};
const NEEDS_IDENTITY = new Set(["hello"]);

async function handleCall(identity, msg) {
  const name = msg.function;
  let reply;
  try {
    if (typeof name !== "string") {
      reply = { type: "error", error: "ValueError: Call message is missing the 'function' field\n" };
    } else if (name.startsWith("_")) {
      reply = { type: "error", error: `AttributeError: Cannot call private method '${name}'\n` };
    } else if (!Object.hasOwn(functions, name)) {
      reply = { type: "error", error: `AttributeError: Function '${name}' not found\n` };
    } else {
      const args = Array.isArray(msg.args) ? msg.args : [];
      const fn = functions[name];
      const result = NEEDS_IDENTITY.has(name) ? await fn(identity, ...args) : await fn(...args);
      reply = { type: "response", result: toWire(result) };
    }
  } catch (err) {
    reply = { type: "error", error: errorText(err) };
  }
  await send(identity, { id: msg.id, ...reply });
}

// ------------------------------------------------------------------------------ main

function portFromEnv() {
  const text = process.env.COMLINK_ZMQ_PORT;
  if (text === undefined) throw new Error("COMLINK_ZMQ_PORT is not set: start this worker from a parent");
  const port = Number(text);
  if (!/^\d+$/.test(text.trim()) || !Number.isInteger(port)) {
    throw new Error(`COMLINK_ZMQ_PORT=${JSON.stringify(text)} is not a port number`);
  }
  if (port < 1024 || port > 65535) throw new Error(`COMLINK_ZMQ_PORT=${port} is outside 1024..65535`);
  return port;
}

async function stop(code) {
  try {
    await sendChain;
  } finally {
    sock.close();
    process.exit(code);
  }
}

async function main() {
  // `--worker` is accepted and not required; other argv is ignored.
  let port;
  try {
    port = portFromEnv();
  } catch (err) {
    process.stderr.write(`node worker: ${err.message}\n`);
    process.exit(1);
  }

  // A parent that dies without saying shutdown must not leave us behind.
  const parent = process.ppid;
  setInterval(() => {
    if (process.ppid !== parent) stop(0);
  }, PPID_POLL_MS).unref();
  process.on("SIGTERM", () => stop(0));
  process.on("SIGINT", () => stop(0));

  sock.connect(`tcp://127.0.0.1:${port}`);

  for await (const frames of sock) {
    if (frames.length < 3) continue; // [identity, "", payload]
    const identity = frames[0];
    let msg;
    try {
      msg = unpack(frames[frames.length - 1]);
    } catch {
      continue; // not msgpack: drop
    }
    if (msg === null || typeof msg !== "object" || Array.isArray(msg) || msg.app !== APP) continue;
    if (typeof msg.id !== "string") continue;
    switch (msg.type) {
      case "call":
        if ((msg.namespace ?? NAMESPACE) !== NAMESPACE) break;
        handleCall(identity, msg); // not awaited: heartbeats are answered while calls run
        break;
      case "heartbeat": {
        const meta = msg.metadata && typeof msg.metadata === "object" ? msg.metadata : {};
        if (meta.hb_response) break;
        send(identity, {
          id: msg.id,
          type: "heartbeat",
          metadata: { hb_timestamp: meta.hb_timestamp ?? null, hb_response: true },
        });
        break;
      }
      case "shutdown":
        await stop(0);
        return;
      default:
        break; // unknown types (e.g. the `cancel` extension) are ignored
    }
  }
}

main().catch((err) => {
  process.stderr.write(`node worker: ${errorText(err)}\n`);
  process.exit(1);
});

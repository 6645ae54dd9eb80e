// A minimal Multifrost v4 PARENT (caller) in Node.js, spawn mode, written from PROTOCOL.md.
//
// Binds a DEALER to tcp://127.0.0.1:0, starts `<python> <script> --worker` with
// COMLINK_ZMQ_PORT / COMLINK_WORKER_MODE=1, waits for a heartbeat echo (readiness), makes a
// few calls, sends `shutdown` and waits for the child to exit. Prints ONE JSON line with the
// results on stdout; exits 0 only if every check passed (1: a check failed, 2: an error or
// the 20 s self-timeout, which kills the child first).
//
// Usage: node caller.mjs <python-executable> <worker-script.py>

import { spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { isDeepStrictEqual } from "node:util";
import process from "node:process";

import { Packr, unpack } from "msgpackr";
import { Dealer } from "zeromq";

const APP = "comlink_ipc_v4";
const OVERALL_TIMEOUT_MS = 20_000;
const REPLY_TIMEOUT_MS = 10_000;
const EXIT_TIMEOUT_MS = 5_000;

const packr = new Packr({ useRecords: false, encodeUndefinedAsNil: true });

const [python, script] = process.argv.slice(2);
if (!python || !script) {
  process.stderr.write("usage: node caller.mjs <python-executable> <worker-script.py>\n");
  process.exit(2);
}

const results = { checks: {}, output: [] };
let child = null;
let childExit = null; // resolves to {code, signal}

function now() {
  const seconds = Date.now() / 1000;
  return Number.isInteger(seconds) ? seconds + 1e-6 : seconds;
}

/** JSON-friendly view of a decoded value: Buffers as {"bin": hex}, BigInts as strings. */
function toJson(value) {
  if (typeof value === "bigint") return value.toString();
  if (value instanceof Uint8Array) return { bin: Buffer.from(value).toString("hex") };
  if (Array.isArray(value)) return value.map(toJson);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, toJson(v)]));
  }
  return value;
}

function finish(code) {
  process.stdout.write(`${JSON.stringify(toJson(results))}\n`);
  try {
    sock.close();
  } catch {
    // already closed
  }
  process.exit(code);
}

function killChild() {
  if (child !== null && child.exitCode === null && child.signalCode === null) {
    try {
      child.kill("SIGKILL");
    } catch {
      // already gone
    }
  }
}

const selfTimeout = setTimeout(() => {
  results.error = `caller timed out after ${OVERALL_TIMEOUT_MS} ms`;
  killChild();
  finish(2);
}, OVERALL_TIMEOUT_MS);

// ------------------------------------------------------------------------------ socket

const sock = new Dealer({ linger: 0 });
const waiting = new Map(); // id -> {resolve, kind}
let sendChain = Promise.resolve();

function send(message) {
  const payload = packr.pack({ app: APP, timestamp: now(), ...message });
  // zeromq.js allows one send at a time: queue them, in order.
  sendChain = sendChain.then(() => sock.send(["", payload]));
  return sendChain;
}

function expectReply(id, kinds) {
  const promise = new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      waiting.delete(id);
      reject(new Error(`no ${kinds.join("/")} for ${id} within ${REPLY_TIMEOUT_MS} ms`));
    }, REPLY_TIMEOUT_MS);
    waiting.set(id, {
      kinds,
      resolve: (msg) => {
        clearTimeout(timer);
        resolve(msg);
      },
    });
  });
  promise.catch(() => {}); // a reply nobody awaits any more must not crash the process
  return promise;
}

async function readLoop() {
  for await (const frames of sock) {
    if (frames.length < 2) continue; // [b"", payload]: use the last frame
    let msg;
    try {
      msg = unpack(frames[frames.length - 1]);
    } catch {
      continue;
    }
    if (msg === null || typeof msg !== "object" || msg.app !== APP) continue;
    if (msg.type === "stdout" || msg.type === "stderr") {
      results.output.push([msg.type, msg.output ?? ""]);
      continue;
    }
    const entry = waiting.get(msg.id);
    if (entry !== undefined && entry.kinds.includes(msg.type)) {
      waiting.delete(msg.id);
      entry.resolve(msg);
    }
  }
}

async function call(fn, ...args) {
  const id = randomUUID();
  const reply = expectReply(id, ["response", "error"]);
  await send({ id, type: "call", function: fn, args, namespace: "default" });
  const msg = await reply;
  return msg.type === "response" ? { ok: true, result: msg.result ?? null } : { ok: false, error: msg.error ?? "Unknown error" };
}

function check(name, passed, detail) {
  results.checks[name] = passed;
  if (!passed) results.failed = [...(results.failed ?? []), `${name}: ${JSON.stringify(toJson(detail))}`];
}

// ------------------------------------------------------------------------------ main

async function main() {
  await sock.bind("tcp://127.0.0.1:0");
  const port = Number(sock.lastEndpoint.split(":").pop());
  results.port = port;
  readLoop().catch(() => {}); // ends when the socket closes

  const env = { ...process.env, COMLINK_ZMQ_PORT: String(port), COMLINK_WORKER_MODE: "1" };
  delete env.MULTIFROST_TRIO_PARENT_FD; // that pipe belongs to a multifrost_trio parent
  // The child's raw stdout/stderr go to our stderr: our stdout carries only the JSON line.
  child = spawn(python, [script, "--worker"], { env, stdio: ["ignore", 2, 2] });
  childExit = new Promise((resolve) => {
    child.on("exit", (code, signal) => resolve({ code, signal }));
    child.on("error", (err) => resolve({ code: null, signal: null, error: String(err) }));
  });
  results.child_pid = child.pid;

  // Readiness: the first heartbeat echo (the send waits until the child has connected).
  const hbId = randomUUID();
  const hbStamp = now();
  const echoed = expectReply(hbId, ["heartbeat"]);
  // The send itself waits until the child has connected, so it races the child's exit too.
  const sent = send({ id: hbId, type: "heartbeat", metadata: { hb_timestamp: hbStamp } });
  const ready = await Promise.race([
    Promise.all([sent, echoed]).then(([, msg]) => msg),
    childExit.then((exit) => {
      throw new Error(`child exited during start-up: ${JSON.stringify(exit)}`);
    }),
  ]);
  results.heartbeat = { id: ready.id, metadata: ready.metadata ?? null, rtt_ms: (now() - hbStamp) * 1000 };
  check(
    "heartbeat",
    ready.id === hbId && ready.metadata?.hb_timestamp === hbStamp && ready.metadata?.hb_response === true,
    ready,
  );

  const add = await call("add", 20, 22);
  results.add = add;
  check("add", add.ok && add.result === 42, add);

  const value = {
    text: "héllo wörld ✓",
    int: 7,
    negative: -123456,
    big: 2n ** 40n,
    float: 1.25,
    yes: true,
    no: false,
    nothing: null,
    list: [1, "two", [3, [4.5]], {}],
    bytes: Buffer.from([0, 1, 2, 127, 128, 255]),
    nested: { deeper: { bin: Buffer.from("zmq"), empty: Buffer.alloc(0), items: [] } },
  };
  const echo = await call("echo", value);
  results.echo = echo;
  check("echo", echo.ok && isDeepStrictEqual(echo.result, value), echo);

  const unknown = await call("no_such_function", 1);
  results.unknown = unknown;
  check("unknown", !unknown.ok && unknown.error.includes("not found"), unknown);

  const fail = await call("fail", "boom from node");
  results.fail = fail;
  check("fail", !fail.ok && fail.error.startsWith("ValueError: boom from node"), fail);

  // Printed output travels as stdout/stderr messages, and before the call's reply.
  const shout = await call("shout", "hey");
  results.shout = shout;
  const seen = results.output.map(([stream, text]) => `${stream}:${text}`).join("");
  check("shout", shout.ok && shout.result === "HEY" && seen.includes("stdout:hey\n") && seen.includes("stderr:err:hey\n"), {
    shout,
    output: results.output,
  });

  const functions = await call("list_functions");
  results.list_functions = functions;
  check(
    "list_functions",
    functions.ok && Array.isArray(functions.result) && ["add", "echo", "fail"].every((f) => functions.result.includes(f)),
    functions,
  );

  // shutdown: the child must exit on its own, cleanly.
  await send({ id: randomUUID(), type: "shutdown" });
  const exited = await Promise.race([
    childExit,
    new Promise((resolve) => setTimeout(() => resolve(null), EXIT_TIMEOUT_MS)),
  ]);
  if (exited === null) {
    killChild();
    results.exit = { code: null, signal: null, error: `did not exit within ${EXIT_TIMEOUT_MS} ms of shutdown` };
  } else {
    results.exit = exited;
  }
  check("exit", results.exit.code === 0, results.exit);

  clearTimeout(selfTimeout);
  finish(Object.values(results.checks).every(Boolean) ? 0 : 1);
}

function fatal(err) {
  results.error = err instanceof Error ? `${err.name}: ${err.message}` : String(err);
  killChild();
  clearTimeout(selfTimeout);
  finish(2);
}

process.on("unhandledRejection", fatal);
main().catch(fatal);

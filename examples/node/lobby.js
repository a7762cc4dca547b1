#!/usr/bin/env node
// A live lobby: who is in, and who is ACTIVE, kept up to date from hub's change feed.
//
//     node examples/node/lobby.js --target 127.0.0.1:50051 [--for SECONDS]
//
// The same lobby as examples/python/lobby.py, with @grpc/grpc-js and @grpc/proto-loader
// loading protos/user/v1/*.proto at run time (no generated code). README's "List, then watch":
//
// 1. ListUsers streams every user; its trailing metadata carries `hub-resume-token`, a
//    position taken just *before* the listing began.
// 2. UserSyncService.Sync, subscribed with that token, replays every change made since, then
//    goes on live. Some of those changes may already show in the listing, so an event is
//    applied only if its version is newer than the one the lobby holds; a delete drops the
//    user. Like hub.client.SyncFeed, the watch resumes by itself from its last token when the
//    stream breaks, and rebuilds from a snapshot when hub says the history is gone.
//
// It prints a line per change and the lobby after each batch, and with --for it stops by itself
// that many seconds after its listing. Its last line is always one JSON object, its view:
// {"active", "applied", "events", "listed", "resume_token", "users": [{"email", "id", "name",
// "status", "version"}...] (in id order)}. Ctrl-C (or SIGTERM) stops it the same way.
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');
const RESUME_TOKEN_KEY = 'hub-resume-token';
const SHOWN_NAMES = 10;
const STREAM_DEADLINE_MS = 3600 * 1000; // a long-lived stream, never without a deadline
const BACKOFF_MS = [50, 5000]; // reconnect backoff: first, most
// Codes after which the watch reconnects and resumes from its last token (as SyncFeed does).
const RESUMABLE = new Set([
  grpc.status.OK, grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED,
  grpc.status.CANCELLED, grpc.status.INTERNAL, grpc.status.UNKNOWN, grpc.status.ABORTED,
  grpc.status.RESOURCE_EXHAUSTED,
]);

function loadApi() {
  const definition = protoLoader.loadSync(
    ['user/v1/user_service.proto', 'user/v1/user_sync_service.proto'],
    // Field names as in the .proto; enums by name; int64 (version) as a JS number.
    { includeDirs: [PROTOS], keepCase: true, enums: String, longs: Number, defaults: true,
      oneofs: true },
  );
  return grpc.loadPackageDefinition(definition).user.v1;
}

const statusOf = (user) => user.status.replace(/^USER_STATUS_/, '');
const label = (user) => user.name || user.email || user.id;
const byId = (a, b) => (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
const say = (text) => process.stdout.write(`${text}\n`);

class Lobby {
  constructor() {
    this.users = new Map(); // id -> user, at the newest version seen
    this.listed = 0; // users the listing returned
    this.events = 0; // events received
    this.applied = 0; // events that changed the view (the others were already in it)
  }

  list(user) {
    this.users.set(user.id, user);
    this.listed += 1;
  }

  // Applies one event if it is newer than what the lobby has; returns what changed, or null.
  apply(event) {
    this.events += 1;
    const user = event.user;
    const held = this.users.get(user.id);
    if (held && user.version <= held.version) return null; // already had this change
    if (event.type === 'EVENT_TYPE_DELETED') {
      if (!this.users.delete(user.id)) return null; // created and deleted before we held it
      this.applied += 1;
      return `- ${label(user)} left (v${user.version})`;
    }
    this.users.set(user.id, user);
    this.applied += 1;
    if (!held) return `+ ${label(user)} joined, ${statusOf(user)} (v${user.version})`;
    if (held.status !== user.status) {
      return `~ ${label(user)} is now ${statusOf(user)} (v${user.version})`;
    }
    return `~ ${label(user)} changed (v${user.version})`;
  }

  sorted() {
    return [...this.users.values()].sort(byId);
  }

  active() {
    return this.sorted().filter((u) => u.status === 'USER_STATUS_ACTIVE');
  }

  line() {
    const active = this.active();
    const names = active.slice(0, SHOWN_NAMES).map(label).join(', ');
    const more = active.length > SHOWN_NAMES ? ` (+${active.length - SHOWN_NAMES} more)` : '';
    return `lobby: ${active.length} active of ${this.users.size}: ${names}${more}`;
  }

  summary(resumeToken) {
    return {
      active: this.active().map((u) => u.id),
      applied: this.applied,
      events: this.events,
      listed: this.listed,
      resume_token: resumeToken,
      users: this.sorted().map((u) => ({
        email: u.email, id: u.id, name: u.name, status: u.status, version: u.version,
      })),
    };
  }
}

// Step 1: the listing, and the token positioned just before it.
function listUsers(users, lobby) {
  return new Promise((resolve, reject) => {
    const call = users.ListUsers({ page_size: 500 },
      { deadline: Date.now() + 300 * 1000 });
    let ended = false;
    let token = null;
    const done = () => {
      if (!ended || token === null) return;
      if (!token) reject(new Error(`ListUsers sent no ${RESUME_TOKEN_KEY}: is this a hub?`));
      else resolve(token);
    };
    call.on('data', (user) => lobby.list(user));
    call.on('error', reject);
    // 'status' (with the trailers) may come before the last 'data': wait for 'end' as well.
    call.on('status', (status) => {
      if (status.code !== grpc.status.OK) return; // 'error' has rejected already
      token = String(status.metadata.get(RESUME_TOKEN_KEY)[0] || '');
      done();
    });
    call.on('end', () => { ended = true; done(); });
  });
}

// Step 2: every change since the listing, then live; reconnects and resumes until stopped.
class Watch {
  constructor(sync, lobby, resumeToken, started) {
    this.sync = sync;
    this.lobby = lobby;
    this.resumeToken = resumeToken;
    this.started = started;
    this.snapshot = false; // true while rebuilding from a snapshot (continuity lost)
    this.failures = 0;
    this.call = null;
    this.timer = null;
    this.stopped = false;
  }

  start() {
    if (this.stopped) return;
    const call = this.sync.Sync({ deadline: Date.now() + STREAM_DEADLINE_MS });
    this.call = call;
    let ended = false;
    call.on('data', (response) => this.onResponse(response));
    call.on('error', (err) => { ended = true; this.onEnd(err.code, err.details, err.metadata); });
    call.on('end', () => { if (!ended) { ended = true; this.onEnd(grpc.status.OK, '', null); } });
    // Mid-snapshot tokens are not adopted: a snapshot cut short starts again.
    const subscribe = this.snapshot ? { snapshot: true } : { resume_token: this.resumeToken };
    call.write({ subscribe });
  }

  onResponse(response) {
    this.failures = 0;
    if (this.snapshot && response.snapshot_complete) this.snapshot = false;
    if (!this.snapshot) this.resumeToken = response.resume_token;
    const changes = response.events.map((e) => this.lobby.apply(e)).filter(Boolean);
    const at = ((Date.now() - this.started) / 1000).toFixed(2).padStart(6);
    for (const change of changes) say(`[${at}s] ${change}`);
    if (changes.length) say(this.lobby.line());
  }

  onEnd(code, details, metadata) {
    this.call = null;
    if (this.stopped) return;
    if (code === grpc.status.OUT_OF_RANGE) {
      // The history after our token is gone: rebuild the lobby from a snapshot.
      say(`continuity lost (${details}): rebuilding from a snapshot`);
      this.lobby.users.clear();
      this.snapshot = true;
      this.resumeToken = '';
      this.start();
      return;
    }
    if (!RESUMABLE.has(code)) {
      process.stderr.write(`Sync failed: ${grpc.status[code]} ${details}\n`);
      process.exitCode = 1;
      stop();
      return;
    }
    if (code === grpc.status.RESOURCE_EXHAUSTED) {
      // Too slow: the token of the last response sent is in the trailers; resume at once.
      const token = metadata && metadata.get(RESUME_TOKEN_KEY)[0];
      if (token && !this.snapshot) this.resumeToken = String(token);
      this.start();
      return;
    }
    this.failures += 1;
    const [low, high] = BACKOFF_MS;
    const pause = Math.random() * Math.min(high, low * 2 ** Math.min(this.failures, 16));
    this.timer = setTimeout(() => this.start(), pause);
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    if (this.call) this.call.cancel();
  }
}

function parse(argv) {
  const args = { target: 'localhost:50051', seconds: null };
  for (let i = 0; i < argv.length; i += 1) {
    const [flag, inline] = argv[i].split(/=(.*)/s);
    const value = () => (inline !== undefined ? inline : argv[++i]);
    if (flag === '--target') args.target = value();
    else if (flag === '--for') args.seconds = Number(value());
    else if (flag === '-h' || flag === '--help') {
      say('usage: lobby.js [--target HOST:PORT] [--for SECONDS]');
      process.exit(0);
    } else {
      process.stderr.write(`lobby.js: unknown argument ${argv[i]}\n`);
      process.exit(2);
    }
  }
  if (!args.target || (args.seconds !== null && !(args.seconds >= 0))) {
    process.stderr.write('lobby.js: --target needs HOST:PORT, --for a number of seconds\n');
    process.exit(2);
  }
  return args;
}

let stop = () => {};

async function main() {
  const args = parse(process.argv.slice(2));
  const api = loadApi();
  const credentials = grpc.credentials.createInsecure();
  const users = new api.UserService(args.target, credentials);
  const lobby = new Lobby();
  const token = await listUsers(users, lobby);
  users.close();
  say(`listed ${lobby.listed} users; watching from token ${token.slice(0, 12)}...`);
  say(lobby.line());

  const sync = new api.UserSyncService(args.target, credentials);
  const watch = new Watch(sync, lobby, token, Date.now());
  let timer = null;
  stop = () => {
    stop = () => {};
    clearTimeout(timer);
    watch.stop();
    say(JSON.stringify(lobby.summary(watch.resumeToken)));
    sync.close();
  };
  process.on('SIGINT', () => stop());
  process.on('SIGTERM', () => stop());
  if (args.seconds !== null) timer = setTimeout(() => stop(), args.seconds * 1000);
  watch.start();
}

main().catch((err) => {
  process.stderr.write(`lobby.js: ${err.message}\n`);
  process.exit(1);
});

// Node's IPC, measured the way herd-bench ipc-probe measures herd's: a parent
// and one forked child (child_process.fork, the channel cluster uses), ~100-byte
// JSON messages. Usage: node ipc.js COUNT RTT — prints one JSON line.
const { fork } = require('child_process');

const BODY = 'herd ipc benchmark payload, about one hundred bytes in all with its seq';

if (process.argv[2] === 'child') {
  let got = 0;
  process.on('message', (m) => {
    if (m.t === 'ping') process.send({ t: 'pong', n: m.n });
    else if (m.t === 'data') got++;
    else if (m.t === 'count') { process.send({ t: 'count', n: got }); got = 0; }
    else if (m.t === 'sendme') { for (let seq = 0; seq < m.n; seq++) process.send({ t: 'data', seq, body: BODY }); }
  });
  process.send({ t: 'ready' });
} else {
  const count = parseInt(process.argv[2] || '100000', 10);
  const rtt = parseInt(process.argv[3] || '10000', 10);
  const child = fork(__filename, ['child']);
  let waiter = null;
  const queue = [];
  child.on('message', (m) => { if (waiter) { const w = waiter; waiter = null; w(m); } else queue.push(m); });
  const next = () => new Promise((resolve) => { if (queue.length) resolve(queue.shift()); else waiter = resolve; });
  const now = () => process.hrtime.bigint();
  (async () => {
    await next(); // ready
    const rtts = [];
    for (let i = 0; i < rtt; i++) {
      const t = now();
      child.send({ t: 'ping', n: i });
      await next();
      rtts.push(Number(now() - t) / 1000);
    }
    rtts.sort((a, b) => a - b);
    let t = now();
    for (let seq = 0; seq < count; seq++) child.send({ t: 'data', seq, body: BODY });
    child.send({ t: 'count' });
    const c = await next();
    if (c.n !== count) throw new Error(`child counted ${c.n}`);
    const p2w = Number(now() - t) / 1e9;
    t = now();
    child.send({ t: 'sendme', n: count });
    for (let i = 0; i < count; i++) await next();
    const w2p = Number(now() - t) / 1e9;
    const pct = (q) => rtts[Math.floor((rtts.length - 1) * q)];
    console.log(JSON.stringify({ p2w_per_s: count / p2w, w2p_per_s: count / w2p, rtt_p50_us: pct(0.5), rtt_p99_us: pct(0.99) }));
    child.kill();
  })().catch((e) => { console.error(e); child.kill(); process.exit(1); });
}

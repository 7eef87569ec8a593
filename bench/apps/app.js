// The benchmark app: a minimal Node HTTP hello world, the same file under every
// system. Under herd (and the supervisor-less launcher) it serves on the
// inherited fd 3; under Node cluster, PM2 and alone it listens on $PORT.
// Each response names the worker (x-worker: pid). With BENCH_STATS_DIR set it
// writes PID.ready there once listening, and its request and connection
// counts (PID.json) twice a second. The chaos scenario makes the next start
// crash by leaving `crash-next` there: the first worker to start takes it
// (unlink is atomic, so only one does), notes `crashed.SLOT.PID` with the
// time in ms and exits 1 before listening.
const http = require('http');
const fs = require('fs');

const pid = String(process.pid);
const dir = process.env.BENCH_STATS_DIR;
if (dir) {
  let took = false;
  try { fs.unlinkSync(`${dir}/crash-next`); took = true; } catch (_) { /* no flag */ }
  if (took) {
    const slot = process.env.HERD_WORKER_ID || 'none';
    fs.writeFileSync(`${dir}/crashed.${slot}.${pid}`, String(Date.now()));
    process.exit(1);
  }
}
let requests = 0;
let connections = 0;
const server = http.createServer((req, res) => {
  requests++;
  res.setHeader('x-worker', pid);
  res.end('hello world\n');
});
server.on('connection', () => { connections++; });

if (dir) {
  const write = () => {
    const tmp = `${dir}/${pid}.tmp`;
    fs.writeFileSync(tmp, JSON.stringify({ pid: process.pid, requests, connections }));
    fs.renameSync(tmp, `${dir}/${pid}.json`);
  };
  setInterval(write, 500).unref();
}

// Readiness for the bench: a file per worker once it listens.
const ready = () => { if (dir) fs.writeFileSync(`${dir}/${pid}.ready`, ''); };
if (parseInt(process.env.LISTEN_FDS || '0', 10) > 0) {
  server.listen({ fd: 3 }, ready);
} else {
  server.listen(parseInt(process.env.PORT, 10), '127.0.0.1', ready);
}

// Node's cluster module as its users run it: the primary forks $WORKERS
// workers running app.js and, since Node has no respawn, forks a replacement
// when one exits (unless it exited after a disconnect the primary asked
// for). NODE_CLUSTER_SCHED_POLICY (rr | none) picks the balancing.
// SIGHUP is the rolling restart users write by hand: one worker at a time,
// fork a new one, wait for its 'listening', then disconnect the old one and
// wait for it to exit; `reloaded MS` when every worker was replaced.
// Events go to stdout with wall-clock milliseconds (microsecond precision).
const cluster = require('cluster');
const { performance } = require('perf_hooks');

const now = () => (performance.timeOrigin + performance.now()).toFixed(3);

if (cluster.isPrimary) {
  const n = parseInt(process.env.WORKERS || '2', 10);
  for (let i = 0; i < n; i++) cluster.fork();
  cluster.on('exit', (worker) => {
    console.log(`exit ${worker.process.pid} ${now()}`);
    if (worker.exitedAfterDisconnect) return;
    const fresh = cluster.fork();
    console.log(`fork ${fresh.process.pid} ${now()}`);
  });
  let reloading = false;
  process.on('SIGHUP', async () => {
    if (reloading) return;
    reloading = true;
    const start = performance.now();
    for (const old of Object.values(cluster.workers)) {
      const fresh = cluster.fork();
      await new Promise((resolve) => fresh.once('listening', resolve));
      const gone = new Promise((resolve) => old.once('exit', resolve));
      old.disconnect();
      await gone;
    }
    console.log(`reloaded ${(performance.now() - start).toFixed(1)}`);
    reloading = false;
  });
} else {
  require('./app.js');
}

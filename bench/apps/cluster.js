// Node's cluster module as its users run it: the primary forks $WORKERS
// workers running app.js and, since Node has no respawn, forks a replacement
// when one exits. NODE_CLUSTER_SCHED_POLICY (rr | none) picks the balancing.
// Events go to stdout with wall-clock milliseconds (microsecond precision).
const cluster = require('cluster');
const { performance } = require('perf_hooks');

const now = () => (performance.timeOrigin + performance.now()).toFixed(3);

if (cluster.isPrimary) {
  const n = parseInt(process.env.WORKERS || '2', 10);
  for (let i = 0; i < n; i++) cluster.fork();
  cluster.on('exit', (worker) => {
    console.log(`exit ${worker.process.pid} ${now()}`);
    const fresh = cluster.fork();
    console.log(`fork ${fresh.process.pid} ${now()}`);
  });
} else {
  require('./app.js');
}

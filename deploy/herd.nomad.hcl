# One herd per allocation; Nomad spreads the allocations across clients.
job "web" {
  datacenters = ["dc1"]
  type        = "service"

  group "web" {
    count = 3

    network {
      port "http" { to = 8000 }
      port "metrics" { to = 9100 }
    }

    service {
      name     = "web"
      port     = "http"
      provider = "nomad"
      check {
        type     = "http"
        port     = "metrics"
        path     = "/ready"
        interval = "5s"
        timeout  = "2s"
      }
    }

    task "herd" {
      driver = "docker"
      # Above herd's --stop-timeout.
      kill_timeout = "30s"
      kill_signal  = "SIGTERM"
      config {
        image = "herd:latest"
        ports = ["http", "metrics"]
        # A CFS quota (not just shares), so that -w auto sees 2 CPUs.
        cpu_hard_limit = true
        args  = ["run", "-w", "auto", "-l", "0.0.0.0:8000", "--metrics", "0.0.0.0:9100",
                 "--stop-timeout", "20s"]
      }
      resources {
        # With cpu_hard_limit, -w auto follows the quota Docker sets from this.
        cpu    = 2000
        memory = 1024
      }
    }
  }
}

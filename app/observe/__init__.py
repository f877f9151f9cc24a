"""What Corral tells about its jobs as they run: Prometheus metrics summed in Redis, log lines
naming their job and process role, and OpenTelemetry traces."""

"""What every splitserve service process shares: settings from flags and env, the gRPC server with health checks,
Prometheus metrics, graceful SIGTERM, and the translation of typed errors into gRPC statuses."""

"""What a run reports: metric sinks, system metrics and the per-step training metrics,
gradient and activation diagnostics, the profiler, and charts."""

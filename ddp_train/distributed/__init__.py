"""How a run is spread over processes: the launcher environment (ranks, device, process
group), the strategies (none, DDP, FSDP) with their precision, the gradient norm, and
preemption signals."""

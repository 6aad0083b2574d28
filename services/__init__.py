"""vdm-hub services: the worker proxy, the stream service, the demo upstream and tools."""

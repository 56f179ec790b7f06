"""What every benchmark shares: driving SGLang's bench_serving against one server or several replicas."""

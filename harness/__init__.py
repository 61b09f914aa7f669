"""What the tests and benchmarks use to run the product, and nothing the product runs: servers on loopback
(``servers``), vLLM's V2 model runner on this CPU (``v2_on_cpu``)."""

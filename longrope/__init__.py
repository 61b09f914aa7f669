"""The ``longrope`` command: above the RoPE library (``rope_ext``) and the server (``server``), so that
neither imports the other's command line."""

"""Where roles come from: `base` defines the interface, one module per implementation."""

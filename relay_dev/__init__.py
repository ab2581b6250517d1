"""Development and demo tooling, not part of the product: `relay demo`, the embedded PACS
and the synthetic sample studies. Needs the `demo` extra (numpy)."""

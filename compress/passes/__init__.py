"""One file per pass: a strict config class plus a thin pass class. Registered in compress.registry."""

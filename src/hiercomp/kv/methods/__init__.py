"""One file per KV method: evictors (streaming, snapkv, h2o, ems) and encoders (kivi, mustafar, cskv)."""

"""gradstore: a Zarr v3 store of per-example sparse gradient rows."""

"""Ray glue only: extraction (Data), training (Train), sweeps (Tune), prediction (Data) and serving (Serve)."""

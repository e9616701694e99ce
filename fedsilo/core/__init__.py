"""The shared core below every other layer: manifests, share phases, errors, atomic files and validators (each rule once)."""

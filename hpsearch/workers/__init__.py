"""Worker processes: one per device slot, each claiming and training trials, and the parent
process that supervises them."""

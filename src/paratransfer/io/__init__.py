"""What every stage shares: outputs written atomically, readers, one-line errors, flag checks,
the console, devices and process groups."""

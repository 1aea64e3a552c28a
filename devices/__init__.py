"""Device profiles as data, and detection of the current machine."""

"""The commands (console scripts and the root scripts): thin mains over the layers below."""

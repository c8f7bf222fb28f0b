"""qmlkit-example: the plugin package that qmlkit's docs show and its tests install."""

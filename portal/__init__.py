"""The benchmark portal (`raf portal`): public splits to download, a hidden split that never leaves the server,
uploaded encoders scored by workers onto leaderboards with bootstrap intervals. docs/portal.md describes it."""

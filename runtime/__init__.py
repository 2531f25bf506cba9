"""The runtime: runs an archive under device and RAM budgets (core here; backends in cpu/ and vk/; server/, cli/)."""

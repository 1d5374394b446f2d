"""The data path, one stage a module, in the order a batch flows: source, codec, filters, router, lanes, commit."""

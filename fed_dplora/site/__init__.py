"""What runs at a site besides its data: the local DP-SGD trainer and the site's own ledger."""

"""fedenc: code shared by the server, the sites and the simulation drivers."""

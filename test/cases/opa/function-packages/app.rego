package cfg.app

twice := 2 * data.cfg.x

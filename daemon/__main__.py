from daemon.cli import run_main

run_main()

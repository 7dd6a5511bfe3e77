from raylm.cli import main

main()

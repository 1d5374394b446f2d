from replayd.cli import main

main()

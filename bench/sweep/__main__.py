from bench.sweep.run import main

main()

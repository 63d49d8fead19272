from mnist_jax.cli import main

raise SystemExit(main())

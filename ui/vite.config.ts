// Builds the UI into the directory crates/manager/build.rs names (FERRO_UI_OUT), else dist/.
import { defineConfig } from "vite";

export default defineConfig({
  base: "/",
  build: {
    outDir: process.env.FERRO_UI_OUT ?? "dist",
    emptyOutDir: true,
    assetsDir: "assets",
    sourcemap: false,
    chunkSizeWarningLimit: 1024,
  },
  esbuild: { jsx: "automatic", jsxImportSource: "preact" },
});
